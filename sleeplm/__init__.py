"""sleeplm: hybrid attention + fast-weight language models that sleep on each full context window.

Public API: `Config`, `ModelConfig`, `SleepConfig`, `init_params`, `init_state`, `forward`, `wake_step`,
`sleep_step`; the gated delta rule is `sleeplm.ops.gated_delta_rule`.
"""

from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.sleep import forward, init_params, sleep_step, wake_step
from sleeplm.state import AttentionCache, FastWeightState, SleepState, init_state

__all__ = [
    "AttentionCache",
    "Config",
    "FastWeightState",
    "ModelConfig",
    "SleepConfig",
    "SleepState",
    "forward",
    "init_params",
    "init_state",
    "sleep_step",
    "wake_step",
]
