"""An independent, deliberately plain implementation of the model and of the wake/sleep semantics (docs/method.md) for
the tests.

No caches, no window-relative positions, no `lax.scan`: absolute positions, one visibility rule for attention
(a key is visible iff it is causal, within L positions and, under hard eviction, in the query's window), and
Python loops over windows and passes. It shares only the parameter names and the recurrent GDN op with the package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleeplm.config import Config
from sleeplm.ops import gated_delta_rule


def _rms(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _silu(x):
    return x * jax.nn.sigmoid(x)


def _rope(x, positions, theta):
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (jnp.arange(half) / half)
    angle = positions[:, None, None] * freq  # (T, 1, half)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * jnp.cos(angle) - b * jnp.sin(angle), b * jnp.cos(angle) + a * jnp.sin(angle)], -1)


def visible(query_pos, key_pos, config: Config):
    window = config.sleep.window
    ok = (key_pos <= query_pos) & (query_pos - key_pos < window)
    if config.sleep.eviction == "hard":
        ok &= key_pos // window == query_pos // window
    return ok


def _attention(p, x, positions, prev, config):
    """x (B, n, d) at `positions`; prev: None or (k, v, key positions) kept from the previous window."""
    m = config.model
    b, n, _ = x.shape
    hd, kvh = m.head_dim, m.num_kv_heads
    q = (x @ p["q"]["kernel"]).reshape(b, n, m.num_heads, hd)
    k = (x @ p["k"]["kernel"]).reshape(b, n, kvh, hd)
    v = (x @ p["v"]["kernel"]).reshape(b, n, kvh, hd)
    keys, values, key_pos = k, v, positions
    if prev is not None:
        keys, values = jnp.concatenate([prev[0], k], 1), jnp.concatenate([prev[1], v], 1)
        key_pos = jnp.concatenate([prev[2], positions])
    rq, rk = _rope(q, positions, m.rope_theta), _rope(keys, key_pos, m.rope_theta)
    rk = jnp.repeat(rk, m.num_heads // kvh, axis=2)
    rv = jnp.repeat(values, m.num_heads // kvh, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", rq, rk) / jnp.sqrt(hd)
    scores = jnp.where(visible(positions[:, None], key_pos[None, :], config), scores, -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), rv).reshape(b, n, -1)
    return out @ p["o"]["kernel"], (k, v, positions)


def _gdn(p, x, positions, fast_weights, config):
    m = config.model
    b, n, _ = x.shape
    h, dk, dv = m.gdn_heads, m.gdn_head_dim_k, m.gdn_head_dim_v
    qkv = jnp.concatenate([x @ p["q"]["kernel"], x @ p["k"]["kernel"], x @ p["v"]["kernel"]], -1)
    if m.short_conv:  # causal, restarted (zero history) at each window start
        window = config.sleep.window
        out = jnp.zeros_like(qkv)
        for lag in range(m.conv_width):
            shifted = jnp.pad(qkv, [(0, 0), (lag, 0), (0, 0)])[:, :n]
            same_window = (positions - lag) // window == positions // window
            keep = same_window & (jnp.arange(n) >= lag)
            out = out + jnp.where(keep[None, :, None], shifted, 0) * p["conv"][m.conv_width - 1 - lag]
        qkv = out
    q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], -1)
    unit = lambda t: t / jnp.sqrt(jnp.sum(t * t, -1, keepdims=True) + 1e-6)
    q, k = unit(_silu(q).reshape(b, n, h, dk)), unit(_silu(k).reshape(b, n, h, dk))
    g = -jnp.exp(p["A_log"]) * jax.nn.softplus(x @ p["a"]["kernel"] + p["dt_bias"])
    beta = jax.nn.sigmoid(x @ p["b"]["kernel"])
    o, fast_weights = gated_delta_rule(q, k, v.reshape(b, n, h, dv), g, beta, fast_weights, implementation="reference")
    gate = (x @ p["gate"]["kernel"]).reshape(b, n, h, dv)
    o = (_rms(o, p["out_norm"]["scale"], m.norm_eps) * _silu(gate)).reshape(b, n, h * dv)
    return o @ p["o"]["kernel"], fast_weights


def _stack(params, h, positions, fast, prev_kv, config, blocks=None):
    """One pass over all blocks (or over `blocks`, a range). fast / prev_kv: per-layer dicts (updated copies
    returned; kv holds the blocks that ran)."""
    m = config.model
    fast, kv = dict(fast), {}
    for i in range(len(m.layers)) if blocks is None else blocks:
        kind = m.layers[i]
        p = params[f"blocks_{i}"]
        y = _rms(h, p["mixer_norm"]["scale"], m.norm_eps)
        if kind == "attn":
            y, kv[i] = _attention(p["attn"], y, positions, prev_kv.get(i), config)
        else:
            y, fast[i] = _gdn(p["gdn"], y, positions, fast[i], config)
        h = h + y
        z = _rms(h, p["mlp_norm"]["scale"], m.norm_eps)
        h = h + (_silu(z @ p["mlp"]["gate"]["kernel"]) * (z @ p["mlp"]["up"]["kernel"])) @ p["mlp"]["down"]["kernel"]
    return h, fast, kv


def _zero_fast(batch, config):
    m = config.model
    shape = (batch, m.gdn_heads, m.gdn_head_dim_k, m.gdn_head_dim_v)
    return {i: jnp.zeros(shape) for i, kind in enumerate(m.layers) if kind == "gdn"}


def _logits(params, h, config):
    p = params["params"]
    return _rms(h, p["final_norm"]["scale"], config.model.norm_eps) @ p["head"]["kernel"]


def _check_implemented(config: Config) -> None:
    """This model implements the original attention + GDN stack under hard or sliding eviction, and no more: any
    other setting fails here rather than being compared against a model that ignores it."""
    m = config.model
    unsupported = {
        "layers": set(m.layers) - {"attn", "gdn"},
        "sleep.eviction": config.sleep.eviction not in ("hard", "sliding"),
        "rotary_dim": m.rotary_dim != m.head_dim,
        "zero_centered_norm": m.zero_centered_norm,
        "tie_embeddings": m.tie_embeddings,
        "inserted_blocks": bool(m.inserted_blocks),
    }
    named = [name for name, flag in unsupported.items() if flag]
    if named:
        raise NotImplementedError(f"the reference model does not implement {named} of {config}")


def plain_hybrid_forward(params, tokens, config: Config):
    """N = 1: one pass of the stack over the whole sequence, attention masked to the window (hard) or the last L
    positions (sliding), the fast weights running through the whole sequence. No windows, no state."""
    p = params["params"]
    h = p["embedding"]["embedding"][tokens]
    h, _, _ = _stack(p, h, jnp.arange(tokens.shape[1]), _zero_fast(tokens.shape[0], config), {}, config)
    return _logits(params, h, config)


def looped_sleep_forward(params, tokens, config: Config, return_states=False):
    """The semantics as written: per window a wake pass over every block, then (if full and followed) passes 2..N of
    the looped blocks (all, unless sleep.loop_layers names some), each on their previous output, the fast weights
    continuing; then the KV is evicted (hard) or the KV each block computed last is kept (sliding)."""
    _check_implemented(config)
    p = params["params"]
    window, passes = config.sleep.window, config.sleep.passes
    first, last = config.sleep.loop_layers or (0, len(config.model.layers))
    embedded = p["embedding"]["embedding"][tokens]
    length = tokens.shape[1]
    fast, kept, outputs = _zero_fast(tokens.shape[0], config), {}, []
    for start in range(0, length, window):
        positions = jnp.arange(start, min(start + window, length))
        looped, fast, kv = _stack(p, embedded[:, start : start + window], positions, fast, kept, config, range(last))
        out, fast, after = _stack(p, looped, positions, fast, kept, config, range(last, len(config.model.layers)))
        outputs.append(out)
        kv |= after
        if start + window < length:  # full and followed: sleep
            for _ in range(passes - 1):
                looped, fast, again = _stack(p, looped, positions, fast, kept, config, range(first, last))
                kv |= again
        kept = kv if config.sleep.eviction == "sliding" else {}
    logits = _logits(params, jnp.concatenate(outputs, 1), config)
    return (logits, fast) if return_states else logits
