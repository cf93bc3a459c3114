"""Setup: install, repair and reset ComfyUI on a server over SSH, one step at a time.

A *profile* is data (a TOML file in ``core/profiles/``): named parameters with defaults and
a list of steps, each with a ``check`` command that exits 0 when the step is already done,
the ``run`` command, and a timeout. A run executes the steps in order and skips every step
whose check passes, so a run after a failure or a dropped connection resumes where the last
one stopped, and a run on an installed server only checks. One run per server at a time.

The modules, each depending only on those listed before it:

- ``profiles``: parsing and checking the TOML profiles, templating, parameter values;
- ``types``: the views handed out, the observer, the sentences a run fails with;
- ``runlog``: a run's in-memory state: its bounded log, tail and marker lines;
- ``steps``: one step's remote command and running it over SSH;
- ``store``: the ``setup_scripts`` and ``server_executions`` rows;
- ``runner``: executing a run, its progress ticker, the per-server lock;
- ``service``: :class:`SetupService`, the facade the bot and the other services use.
"""

from core.setup.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_PROFILE_DIR,
    SetupProfile,
    SetupStep,
    load_profiles,
)
from core.setup.runner import TICK_SECONDS
from core.setup.service import SetupService
from core.setup.steps import CHECK_TIMEOUT, posix_sh, step_command
from core.setup.types import (
    ACTIVE_STATES,
    RESTART_ERROR,
    STOP_ERROR,
    ExecutionView,
    Installation,
    ResetPlan,
    ResetResult,
    SetupObserver,
    StepOutcome,
)

__all__ = [
    "ACTIVE_STATES",
    "CHECK_TIMEOUT",
    "DEFAULT_PROFILE",
    "DEFAULT_PROFILE_DIR",
    "RESTART_ERROR",
    "STOP_ERROR",
    "TICK_SECONDS",
    "ExecutionView",
    "Installation",
    "ResetPlan",
    "ResetResult",
    "SetupObserver",
    "SetupProfile",
    "SetupService",
    "SetupStep",
    "StepOutcome",
    "load_profiles",
    "posix_sh",
    "step_command",
]
