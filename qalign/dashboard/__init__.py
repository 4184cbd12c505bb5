"""`qalign dashboard`: a read-only live web view of the sweeps in a database."""
