"""sleeplm: hybrid attention + fast-weight language models that sleep on each full context window.

Public API: `Config`, `ModelConfig`, `SleepConfig`, `init_params`, `init_state`, `forward`, `forward_with_state`,
`wake_step`, `sleep_step`; the gated delta rule is `sleeplm.ops.gated_delta_rule`; mixer kinds are registered in
`sleeplm.model.kinds`, tasks in `sleeplm.data`.
"""

from sleeplm.config import Config, ModelConfig, SleepConfig
from sleeplm.core.forward import forward, forward_with_state
from sleeplm.core.parameters import init_params
from sleeplm.core.state import SleepState, init_state
from sleeplm.core.streaming import sleep_step, wake_step
from sleeplm.model.attention import AttentionCache
from sleeplm.model.gdn import FastWeightState

__all__ = [
    "AttentionCache",
    "Config",
    "FastWeightState",
    "ModelConfig",
    "SleepConfig",
    "SleepState",
    "forward",
    "forward_with_state",
    "init_params",
    "init_state",
    "sleep_step",
    "wake_step",
]
