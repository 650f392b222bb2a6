"""The CPU-scale reproduction: each sweep is a list of runs, a preset plus `--SECTION.FIELD` overrides.

Scale, chosen by measurement on the 2-core CPU (the paper's is in docs/method.md, "The paper's numbers"): the
`rule110-cpu` preset (4 blocks attn/GDN/attn/GDN, d=64, 4 strings of width 12, window L=12 = one string per
window, hard eviction, labels after all strings, batch 64), 600 steps with warmup 30 and cosine decay, held-out
exact accuracy every 50 steps on 512 sequences. One N=1 run takes about 3 minutes, N=4 about 4 times that. Depth
t is the knob the paper sweeps.
"""

from __future__ import annotations

import dataclasses

from sleeplm.training.presets import ALTERNATING4


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    preset: str
    overrides: dict[str, str]


RULE110 = {
    "train.steps": "600",
    "train.warmup_steps": "30",
    "run.eval_every": "50",
    "run.checkpoint_every": "200",
    "run.progress": "false",
}
RULE110_DEPTHS = (0, 2, 3, 4, 5, 6)
# N=1, seed 0, final exact. rule110-lr-t3: 1e-3 0.248, 2e-3 0.691, 4e-3 1.000, 8e-3 1.000. rule110-lr-t4, the depth
# N=1 fails at with 4e-3: 2e-3 0.139, 4e-3 0.139, 8e-3 0.463, 1.6e-2 0.119. Tuned at the sleep sweep's depth.
TUNED_MUON_LR = "8e-3"
LEARNING_RATES = ("1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2")  # Muon's, for the hidden matrices (AdamW's stays at 1e-3)
SEEDS = (0, 1, 2)
MORE_SEEDS = (3, 4, 5)  # N=1 and N=2 only: at t=4 the seed spread (~0.3) is larger than the gains
ATTENTION_ONLY = "attn,attn,attn,attn"
HYBRID_8 = ",".join(ALTERNATING4 * 2)  # the presets' 4-block hybrid, twice


def rule110(name: str, depth: int, passes: int = 1, seed: int = 0, **extra: str) -> Run:
    overrides = RULE110 | {"task.steps": str(depth), "sleep.passes": str(passes), "train.seed": str(seed)}
    return Run(name, "rule110-cpu", overrides | extra)


QUIET = {"run.progress": "false"}
# Depo and arithmetic at a size N=1 learns (the presets' depo-cpu and arith-cpu stayed at chance in 600 steps at
# Muon 2e-3: results/preset-size/): one window of edges (6-8 nodes, 16 names) and k <= 4 hops; 16 variables mod 5,
# chains of <= 3 ops over 2 windows of 24. d=64, batch 64, the tuned rate, 600 steps (as for Rule 110).
SMALL = QUIET | {"model.d_model": "64", "train.batch_size": "64", "train.steps": "600", "train.warmup_steps": "30"}
DEPO = SMALL | {
    "task.min_nodes": "6",
    "task.max_nodes": "8",
    "task.name_tokens": "16",
    "task.max_hops": "4",
    "task.queries": "8",
    "sleep.window": "16",
}
# Depo with one hop only (train and held-out), the setting in which the model learns the task without eviction
# (depo-1hop/no-eviction: 0.976 held-out accuracy; the sweep above, k = 1..4 mixed, stayed at chance at every N in
# 600 steps): the sleep comparison between the no-eviction ceiling and the attention-only floor, 1000 steps.
DEPO_ONE_HOP = DEPO | {"task.min_hops": "1", "task.max_hops": "1", "train.steps": "1000"}
# The next step up: k = 1 or 2 hops (each query's k drawn uniformly), otherwise as DEPO_ONE_HOP. One-hop queries keep
# teaching the lookup that two hops compose.
DEPO_TWO_HOPS = DEPO_ONE_HOP | {"task.max_hops": "2"}
ARITH = SMALL | {"task.num_vars": "16", "task.max_ops": "3", "task.windows": "2", "sleep.window": "24"}
# Arithmetic with one operation only, without eviction: is the task learned at all at this size? (The 600-step
# sweep above stayed at chance for every chain length.)
ARITH_ONE_OP = ARITH | {"task.min_ops": "1", "task.max_ops": "1", "train.steps": "1500"}
# The setting in which two windows learn one operation without eviction (arith-1op/no-eviction-ops0-1: 0.580 against
# 0.35-0.36 without the mixture): half the problems ask for a constant (one lookup), 3000 steps.
ARITH_MIX = ARITH_ONE_OP | {"task.min_ops": "0", "train.steps": "3000"}
# Language modelling on the Python standard library (the lm-cpu preset: d=128, 4 blocks, L=64, vocabulary 4096), with
# rows of 8 windows (512 tokens) so that the loss by position within a document reaches [4L, 8L); batch 8 keeps the
# preset's 4096 tokens a step. 800 steps, Muon at the preset's 2e-3.
LM = QUIET | {"task.windows": "8", "train.batch_size": "8", "run.eval_examples": "128", "run.eval_batch_size": "32"}


# A sleep sweep's run names (experiments/report.py reads them back): its bounds, and the prefix of sliding runs.
CEILING, FLOOR = "no-eviction", "attention-evicted"
SLIDING = "sliding-"


def sleep_run(preset: str, overrides: dict[str, str], passes: int, seed: int, sliding: bool = False) -> Run:
    """N passes on one seed, hard eviction ("N{n}-s{seed}") or sliding (the same name prefixed by SLIDING)."""
    extra = {"sleep.passes": str(passes), "train.seed": str(seed)} | ({"sleep.eviction": "sliding"} if sliding else {})
    return Run(f"{SLIDING if sliding else ''}N{passes}-s{seed}", preset, overrides | extra)


def sleep_runs(preset: str, overrides: dict[str, str]) -> list[Run]:
    """The ceiling (the model without eviction), the floor (attention alone, evicted: nothing crosses a window), then
    hard eviction at N = 1 and 2 over SEEDS and N = 4 on the first: N = 1, 2, 4 on the first seed, then N = 1, 2 seed
    by seed, so that a sweep cut short still pairs N = 2 with N = 1 on the same seed (same initialisation and data
    order)."""
    pairs = [(1, SEEDS[0]), (2, SEEDS[0]), (4, SEEDS[0]), *((n, s) for s in SEEDS[1:] for n in (1, 2))]
    return [
        Run(CEILING, preset, overrides | {"sleep.eviction": "none"}),
        Run(FLOOR, preset, overrides | {"model.layers": ATTENTION_ONLY}),
        *(sleep_run(preset, overrides, n, s) for n, s in pairs),
    ]


def sweeps(muon_lr: str) -> dict[str, list[Run]]:
    """All sweeps. The Rule 110 sleep, learning-rate and baseline sweeps exist per depth t (named "-t{t}");
    `muon_lr` is the tuned N=1 rate that every Rule 110 sweep but the learning-rate one uses."""
    lr = {"train.muon_lr": muon_lr}
    every = {
        # Fig. 2a: where does N=1 stop learning within the budget?
        "rule110-depth": [rule110(f"t{t}", t, **lr) for t in RULE110_DEPTHS],
        # Does the gain grow with depth? N=2 at the depths of Fig. 2a.
        "rule110-depth-N2": [rule110(f"t{t}", t, 2, **lr) for t in RULE110_DEPTHS],
        # Fig. 3: Depo at a scaled-down size, loss and accuracy per hop count k.
        "depo": [Run(f"N{n}", "depo-cpu", DEPO | lr | {"sleep.passes": str(n)}) for n in (1, 2, 4)],
        # The same at one hop, where the task is learned without eviction: ceiling, floor, N = 1, 2 (3 seeds), 4.
        "depo-1hop": sleep_runs("depo-cpu", DEPO_ONE_HOP | lr),
        # The same between one and two hops; the ceiling first (is k = 2 learned at all?).
        "depo-2hops": sleep_runs("depo-cpu", DEPO_TWO_HOPS | lr),
        # The upper bound for arithmetic at one operation: the hybrid without eviction at d=64 and 4 blocks, then
        # twice as wide or twice as deep (4 attention blocks: the answer composes several lookups), equal steps.
        "arith-1op": [
            Run("no-eviction", "arith-cpu", ARITH_ONE_OP | lr | {"sleep.eviction": "none"}),
            Run(
                "no-eviction-8blocks",
                "arith-cpu",
                ARITH_ONE_OP | lr | {"sleep.eviction": "none", "model.layers": HYBRID_8},
            ),
            Run(
                "no-eviction-d128", "arith-cpu", ARITH_ONE_OP | lr | {"sleep.eviction": "none", "model.d_model": "128"}
            ),
            # The whole problem in one window of 24 (one distractor statement): is the search among distractors or the
            # composition of lookups what is not learned?
            Run("one-window", "arith-cpu", ARITH_ONE_OP | lr | {"task.windows": "1"}),
            Run("one-window-8blocks", "arith-cpu", ARITH_ONE_OP | lr | {"task.windows": "1", "model.layers": HYBRID_8}),
            # Neither learns it in 1500 steps (about 0.5): does it with more?
            Run("one-window-10k-steps", "arith-cpu", ARITH_ONE_OP | lr | {"task.windows": "1", "train.steps": "10000"}),
            # A curriculum by mixing: half the problems ask for a constant (0 operations, a single lookup, as Depo's one
            # hop); does learning the lookup let one operation compose two?
            Run("one-window-ops0-1", "arith-cpu", ARITH_MIX | lr | {"task.windows": "1"}),
            # The same mixture over the sweep's 2 windows, without eviction: the upper bound for a sleep sweep.
            Run("no-eviction-ops0-1", "arith-cpu", ARITH_MIX | lr | {"sleep.eviction": "none"}),
        ],
        # The sleep comparison at that mixture: ceiling (the run above, reused), floor, hard N = 1, 2 (3 seeds), 4, and
        # sliding N = 1, 2 (Fig. 5). The question opens the first window and the answer closes the second.
        "arith-mix": [
            *sleep_runs("arith-cpu", ARITH_MIX | lr),
            *(sleep_run("arith-cpu", ARITH_MIX | lr, n, SEEDS[0], sliding=True) for n in (1, 2)),
        ],
        # Language modelling with sleep: N = 1 and 2 (hard eviction) between the same hybrid without eviction (an
        # upper bound) and attention alone with eviction (a floor: nothing crosses a window), at equal tokens.
        "lm": [
            Run("N1", "lm-cpu", LM),
            Run("N2", "lm-cpu", LM | {"sleep.passes": "2"}),
            Run("no-eviction", "lm-cpu", LM | {"sleep.eviction": "none"}),
            Run("attention-evicted", "lm-cpu", LM | {"model.layers": ATTENTION_ONLY}),
        ],
        # Fig. 4/5: arithmetic with distractors, accuracy per op count, hard and sliding eviction.
        "arith": [
            Run(f"{eviction}-N{n}", "arith-cpu", ARITH | lr | {"sleep.eviction": eviction, "sleep.passes": str(n)})
            for eviction in ("hard", "sliding")
            for n in (1, 2, 4)
        ],
    }
    for t in range(1, 9):
        # The paper tunes the learning rate on N=1 and reuses it for every N.
        every[f"rule110-lr-t{t}"] = [rule110(f"lr{rate}", t, **{"train.muon_lr": rate}) for rate in LEARNING_RATES]
        # Fig. 2b: N = 1..4 on the same data in the same order, two seeds (N=3 last: the cheapest to leave out).
        every[f"rule110-sleep-t{t}"] = [
            *(rule110(f"N{n}-s{s}", t, n, s, **lr) for n in (1, 2, 4, 3) for s in SEEDS),
            *(rule110(f"N{n}-s{s}", t, n, s, **lr) for s in MORE_SEEDS for n in (1, 2)),
        ]
        # Baselines the paper does not have: no eviction at all (an upper bound), the same transformer evicted (must
        # sit at chance), N=1 trained on 2x and 4x the steps (is sleep better than training longer?), and N=2 on 2x.
        every[f"rule110-baselines-t{t}"] = [
            rule110("full-attention", t, **lr, **{"sleep.eviction": "none", "model.layers": ATTENTION_ONLY}),
            rule110("attention-evicted", t, **lr, **{"model.layers": ATTENTION_ONLY}),
            *(
                rule110(f"N1-{k}x-steps-s{s}", t, 1, s, **lr, **{"train.steps": str(600 * k)})
                for k in (2, 4)
                for s in SEEDS
            ),
            # Equal tokens again, at the longer schedule that N=1 is not limited by: does sleep still help?
            *(rule110(f"N2-2x-steps-s{s}", t, 2, s, **lr, **{"train.steps": "1200"}) for s in SEEDS),
        ]
    return every
