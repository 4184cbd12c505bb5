"""The step service: taking one step of a stored chain and deciding what follows, written once.

`qalign run` (the embedded runner) and the Celery task are thin adapters over it:

* `spec`: a run's typed settings (`RunSpec`), parsed once per run;
* `service`: `StepService.take(chain, step)`: read, talk to the servers, commit or record;
* `policy`: `after_step(outcome, ...)`: continue, retry with backoff, adopt, hand on or stop;
* `drive`: a chain driven through the service and the policy until it stops or is handed on.
"""
