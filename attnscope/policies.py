"""KV-cache policy what-ifs: what a cache keeps, and what that does to the loss and to needle
retrieval (docs/received.md, "Cache policies").

    kept_mass(lm, text, policies=..., budgets=...)   -> the exact attention mass each query keeps
                                                        (policy, budget, layer, head)
    policy_losses(lm, token_ids, policies, budgets)  -> loss and delta_loss (policy, budget)
    policy_needle(lm, probe, policies, budgets, ...) -> needle retrieval (policy, budget)
    run_policies(...)                                 -> all three in one Dataset
    policy_figure(ds, out)                            -> the StreamingLLM-style figure

Policies: `streaming[:S]` (StreamingLLM, Xiao et al. 2024: S sink tokens + the most recent keys,
S = 4 by default), `window` (the most recent keys, no sinks), `static_topk` (the keys that receive
the most attention over the whole text, per layer and head: a static heavy-hitter oracle after
H2O, Zhang et al. 2023). A budget is the number of keys the cache holds.

The loss and needle what-ifs run the model with the attention edit that keeps exactly the
policy's keys (`streaming:S`, budget B = AttentionEdit(window=B - S, keep_sinks=S); `window` =
AttentionEdit(window=B)), on every layer at once. Keys keep their original positions (RoPE is
not re-indexed inside the cache as StreamingLLM's implementation does). `static_topk` keeps a
different key set per layer and head, which an AttentionEdit cannot express: its kept mass is
measured exactly, its loss and needle retrieval are not (NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from attnscope.errors import AttnscopeError
from attnscope.metrics.kept import POLICY_KINDS, Policy, PolicyGrid, parse_policy

__all__ = ["POLICY_KINDS", "DEFAULT_POLICIES", "Policy", "PolicyGrid", "parse_policy", "default_budgets",
           "kept_mass", "policy_losses", "policy_needle", "run_policies", "policy_figure"]

DEFAULT_POLICIES = ("streaming", "window", "static_topk")
LOSS_CHUNK = 512  # positions per lm_head call: the logits of a 64K input at once would not fit


def default_budgets(n_tokens: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` to half the input (at least one budget)."""
    out = []
    b = smallest
    while b <= n_tokens // 2:
        out.append(b)
        b *= 2
    return tuple(out) or (max(1, min(smallest, n_tokens)),)


def make_grid(policies, budgets, n_tokens: int | None = None, sink_tokens: int = 4) -> PolicyGrid:
    """A checked PolicyGrid (budgets default to `default_budgets(n_tokens)`)."""
    if budgets is None:
        if n_tokens is None:
            raise AttnscopeError("give budgets= (cache sizes in tokens)")
        budgets = default_budgets(n_tokens)
    grid = PolicyGrid.make(policies, budgets, default_sinks=sink_tokens)
    if n_tokens is not None:
        grid.check(n_tokens)
    return grid


def kept_mass(lm, text=None, *, token_ids=None, policies=DEFAULT_POLICIES, budgets=None, sink_tokens: int = 4,
              **analyze_kwargs) -> xr.Dataset:
    """`analyze(..., policies=, budgets=)`: the exact kept mass (policy, budget, layer, head),
    the mean over the selected queries (budgets default to powers of two up to half the input)."""
    from attnscope.metrics.analyze import analyze

    if budgets is None:
        n = len(token_ids) if token_ids is not None else len(lm.tokenizer(text)["input_ids"])
        budgets = default_budgets(n)
    return analyze(lm, text, token_ids=token_ids, metrics=("kept_mass",), policies=policies, budgets=budgets,
                   sink_tokens=sink_tokens, **analyze_kwargs)


def _token_nll(model, ids: list[int], positions: np.ndarray) -> np.ndarray:
    """-log p(ids[i + 1] | ids[:i + 1]) for each position i, in float64; logits in chunks of
    positions from the final hidden state (the model's own soft-capping applied)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        hidden = model.base_model(input_ids=x, use_cache=False).last_hidden_state[0]
        head = model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None)
        out = []
        for c0 in range(0, len(positions), LOSS_CHUNK):
            pos = torch.as_tensor(positions[c0:c0 + LOSS_CHUNK], device=device)
            logits = head(hidden[pos]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            target = x[0, pos + 1]
            out.append(-torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0].double().cpu())
    return torch.cat(out).numpy()


def _hf_model(lm):
    return getattr(lm, "model", lm)


def policy_losses(lm, token_ids: Sequence[int], policies=DEFAULT_POLICIES, budgets=None, *,
                  sink_tokens: int = 4, min_position: int = 16, progress: bool | None = None) -> xr.Dataset:
    """Mean next-token loss (nats) at positions min_position..T-2 with the cache of each policy
    and budget on every layer, against the model as it is: `loss` and `delta_loss` (policy,
    budget), `baseline_loss`. One forward per (policy, budget); `static_topk` is NaN (no edit
    expresses it)."""
    from attnscope.progress import bar as progress_bar
    from attnscope.tokens.ablate import ablated

    ids = list(token_ids)
    grid = make_grid(policies, budgets, len(ids), sink_tokens)
    if len(ids) - 1 <= min_position:
        raise AttnscopeError(f"the input has {len(ids)} tokens: no next-token loss from position {min_position}")
    positions = np.arange(min_position, len(ids) - 1)
    model = _hf_model(lm)
    base = float(_token_nll(model, ids, positions).mean())
    loss = np.full((len(grid.policies), len(grid.budgets)), np.nan)
    todo = [(pi, bi) for pi, p in enumerate(grid.policies) for bi in range(len(grid.budgets))
            if p.edit(grid.budgets[bi]) is not None]
    with progress_bar(len(todo), f"loss under cache policies ({len(ids)} tokens)", unit="forward",
                      progress=progress) as bar:
        for pi, bi in todo:
            with ablated(model, grid.policies[pi].edit(grid.budgets[bi])):
                loss[pi, bi] = _token_nll(model, ids, positions).mean()
            bar.advance(1)
    return xr.Dataset(
        {"loss": (("policy", "budget"), loss), "delta_loss": (("policy", "budget"), loss - base),
         "baseline_loss": ((), base)},
        coords={"policy": [p.label for p in grid.policies], "budget": np.array(grid.budgets)},
        attrs={"loss_positions": f"{min_position}..{len(ids) - 2} (predicting the next token)",
               "loss_tokens": len(ids)})


def policy_needle(lm, probe, policies=DEFAULT_POLICIES, budgets=None, *, lengths: Sequence[int] | None = None,
                  depths: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
                  sink_tokens: int = 4, progress: bool | None = None) -> xr.Dataset:
    """Needle retrieval (the share of prompts answered correctly by greedy decoding) of a NIAH
    probe with the cache of each policy and budget on every layer: `needle_correct` (policy,
    budget) and `needle_correct_baseline`; the needle share of the final query under each cache is
    `needle_share` (policy, budget, layer, head; mean over prompts, span needle_value)."""
    from attnscope.probing.builder import build_prompts
    from attnscope.probing.needle import run_probe
    from attnscope.probing.spec import ProbeSpec, load_spec
    from attnscope.tokens.ablate import ablated

    spec = probe if isinstance(probe, ProbeSpec) else load_spec(probe)
    if spec.task == "natural_text":
        raise AttnscopeError(f"probe {spec.name!r} is a natural-text probe; needle retrieval needs a niah probe")
    prompts = build_prompts(spec, lm.tokenizer, lengths=lengths, depths=depths, seeds=seeds,
                            max_context=lm.max_positions)
    shortest = min(p.length for p in prompts)
    grid = make_grid(policies, budgets, shortest, sink_tokens)
    model = _hf_model(lm)

    def measure():
        ds = run_probe(lm, spec, lengths=lengths, depths=depths, seeds=seeds, decode=True, progress=False)
        trials = [d for d in ds.correct.dims]
        share = ds.needle_share.sel(query_set="final", span="needle_value").mean(trials)
        return float(ds.correct.mean()), share

    base, base_share = measure()
    correct = np.full((len(grid.policies), len(grid.budgets)), np.nan)
    shares = np.full((len(grid.policies), len(grid.budgets)) + base_share.shape, np.nan)
    for pi, pol in enumerate(grid.policies):
        for bi, budget in enumerate(grid.budgets):
            edit = pol.edit(budget)
            if edit is None:
                continue
            with ablated(model, edit):
                correct[pi, bi], share = measure()
            shares[pi, bi] = share.values
    return xr.Dataset(
        {"needle_correct": (("policy", "budget"), correct), "needle_correct_baseline": ((), base),
         "needle_share": (("policy", "budget", "layer", "head"), shares.astype(np.float32))},
        coords={"policy": [p.label for p in grid.policies], "budget": np.array(grid.budgets),
                "layer": base_share["layer"].values, "head": base_share["head"].values},
        attrs={"probe": spec.name, "probe_prompts": len(prompts),
               "probe_lengths": json.dumps(sorted({p.length for p in prompts}))})


def run_policies(lm, token_ids: Sequence[int], policies=DEFAULT_POLICIES, budgets=None, *, sink_tokens: int = 4,
                 queries="all", loss: bool = True, probe=None, probe_lengths=None, probe_depths=None,
                 probe_seeds=None, progress: bool | None = None) -> xr.Dataset:
    """Kept mass (per layer and head) + loss + (with `probe`) needle retrieval vs cache budget:
    the data of the StreamingLLM-style figure (`policy_figure`)."""
    from attnscope.capture.queries import DEFAULT_MIN_POSITION, QuerySelection

    ids = list(token_ids)
    grid = make_grid(policies, budgets, len(ids), sink_tokens)
    labels = [p.label for p in grid.policies]
    ds = kept_mass(lm, token_ids=ids, policies=labels, budgets=grid.budgets, sink_tokens=sink_tokens,
                   queries=queries, progress=progress)
    if loss:
        selection = QuerySelection.parse(queries)
        start = selection.min_position if selection.mode in ("all", "strided") else DEFAULT_MIN_POSITION
        ds = ds.merge(policy_losses(lm, ids, labels, grid.budgets, sink_tokens=sink_tokens,
                                    min_position=start, progress=progress), combine_attrs="override")
    if probe is not None:
        needle = policy_needle(lm, probe, labels, grid.budgets, lengths=probe_lengths, depths=probe_depths,
                               seeds=probe_seeds, sink_tokens=sink_tokens, progress=progress)
        needle = needle.rename({"needle_share": "needle_share_final"})
        ds = xr.merge([ds, needle], combine_attrs="drop_conflicts")
    ds.attrs["policies"] = json.dumps(labels)
    ds.attrs["policy_edits"] = json.dumps({p.label: _edit_rule(p) for p in grid.policies})
    return ds


def _edit_rule(policy: Policy) -> str:
    """The attention edit of a policy at budget B, in the --ablate grammar."""
    if policy.kind == "window":
        return "window:B"
    if policy.kind == "streaming":
        return f"window:B-{policy.sinks},sinks:{policy.sinks}"
    return "none (kept mass only: a per-head key set is not an AttentionEdit)"


# ----------------------------------------------------------------------------- the figure
_COLORS = {"streaming": "#0072B2", "window": "#D55E00", "static_topk": "#009E73"}
_MARKERS = {"streaming": "o", "window": "s", "static_topk": "^"}
_LABELS = {"streaming": "StreamingLLM ({sinks} sinks + recent)", "window": "sliding window (no sinks)",
           "static_topk": "static top-k by received attention"}


def figure_records(ds: xr.Dataset) -> list[dict]:
    """The plotted values, one record per (policy, budget): kept mass (mean over layers, heads
    and selected queries), its min over heads, delta loss, needle accuracy."""
    kept = ds.kept_mass.mean(("layer", "head"))
    low = ds.kept_mass.min(("layer", "head"))
    out = []
    for p in ds.policy.values:
        for b in ds.budget.values:
            rec = {"policy": str(p), "budget": int(b), "kept_mass": float(kept.sel(policy=p, budget=b)),
                   "kept_mass_min_head": float(low.sel(policy=p, budget=b))}
            if "delta_loss" in ds:
                rec["delta_loss"] = float(ds.delta_loss.sel(policy=p, budget=b))
            if "needle_correct" in ds:
                rec["needle_correct"] = float(ds.needle_correct.sel(policy=p, budget=b))
            out.append(rec)
    return out


def draw_policy_figure(ds: xr.Dataset, title: str | None = None):
    """A matplotlib Figure: kept mass, delta loss and (with a probe) needle accuracy vs cache
    budget, one line per policy."""
    from attnscope.report.figures import WIDTH, style

    panels = ["kept"] + (["loss"] if "delta_loss" in ds else []) + (["needle"] if "needle_correct" in ds else [])
    recs = figure_records(ds)
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH * 0.95 * len(panels), 2.7), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for p in ds.policy.values:
                kind = str(p).split(":")[0]
                rows = [r for r in recs if r["policy"] == str(p)]
                x = [r["budget"] for r in rows]
                key = {"kept": "kept_mass", "loss": "delta_loss", "needle": "needle_correct"}[panel]
                y = [r[key] for r in rows]
                if all(math.isnan(v) for v in y):
                    continue
                label = _LABELS[kind].format(sinks=str(p).partition(":")[2])
                ax.plot(x, y, marker=_MARKERS[kind], color=_COLORS[kind], label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("cache budget (tokens)")
            if panel == "kept":
                ax.set_ylabel("attention mass kept")
                ax.set_ylim(0, 1.02)
                ax.set_title("kept mass\n(mean over layers, heads, queries)")
                ax.legend(loc="lower right")
            elif panel == "loss":
                ax.set_ylabel("Δ loss (nats / token)")
                finite = ds.delta_loss.values[np.isfinite(ds.delta_loss.values)]
                if finite.size and (finite > 0).all():
                    ax.set_yscale("log")
                else:
                    ax.set_yscale("symlog", linthresh=0.01)
                    ax.axhline(0, color="grey", lw=0.6)
                ax.set_title(f"loss increase over the full cache\n(full cache: {float(ds.baseline_loss):.3f} nats)")
            else:
                ax.set_ylabel("needle answered correctly")
                ax.set_ylim(-0.05, 1.05)
                ax.axhline(float(ds.needle_correct_baseline), color="grey", lw=0.8, ls="--", label="full cache")
                ax.set_title(f"needle retrieval\n({ds.attrs.get('probe', '')}, "
                             f"{ds.attrs.get('probe_prompts', '?')} prompts)")
                ax.legend(loc="lower right")
        if title:
            fig.suptitle(title, y=1.06)
    return fig


def policy_figure(ds: xr.Dataset, out: str | Path, *, stem: str | None = None, command: str = "",
                  store: str = "", title: str | None = None) -> list[Path]:
    """Write the figure as `stem`.pdf / .png and a JSON sidecar (data, store, command)."""
    from attnscope.report.figures import save_figure

    model = str(ds.attrs.get("model", "model"))
    stem = stem or f"policies_{Path(model).name}"
    n = ds.attrs.get("n_tokens", "")
    fig = draw_policy_figure(ds, title or f"{model}: what a KV cache keeps ({n} tokens)")
    return save_figure(fig, out, stem, store=store, command=command, data=figure_records(ds),
                       extra={"policies": json.loads(ds.attrs.get("policies", "[]"))})
