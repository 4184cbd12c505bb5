"""Pure sampling logic: states, cut distributions, the MH kernel, randomness, voting. No IO.

`qalign.core.diagnostics` (R-hat and ESS of MCMC draws) is imported on its own: it needs NumPy,
which the sampling path does not.
"""

from qalign.core.index import (
    Block,
    IndexDistribution,
    LastBlock,
    Uniform,
    Zero,
    index_distribution,
)
from qalign.core.kernel import (
    Decision,
    KernelConfig,
    Method,
    RejectReason,
    StepPlan,
    check_continuation,
    decide,
    kernel_config,
    log_acceptance,
    make_proposal,
    plan_initial,
    plan_step,
)
from qalign.core.rng import Purpose, generator_seed, uniform
from qalign.core.state import Finish, State
from qalign.core.voting import best_of_n, majority_vote, weighted_vote

__all__ = [
    "Block",
    "Decision",
    "Finish",
    "IndexDistribution",
    "KernelConfig",
    "LastBlock",
    "Method",
    "Purpose",
    "RejectReason",
    "State",
    "StepPlan",
    "Uniform",
    "Zero",
    "best_of_n",
    "check_continuation",
    "decide",
    "generator_seed",
    "index_distribution",
    "kernel_config",
    "log_acceptance",
    "majority_vote",
    "make_proposal",
    "plan_initial",
    "plan_step",
    "uniform",
    "weighted_vote",
]
