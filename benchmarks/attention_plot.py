"""bench_attention's CPU figure: cpu_results.png, time against SDPA and bytes kept."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def write_cpu_plot(timings: list, saved: list, path: Path) -> bool:
    """Two panels against the sequence length: ckpt_attn's time over SDPA's (forward, and
    forward + backward; causal and not), and the bytes one call keeps for backward
    (ckpt_attn, SDPA, naive; log scale). False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (time, memory) = plt.subplots(1, 2, figsize=(12, 5))
    for mode, marker in (("fwd", "o"), ("fwd_bwd", "s")):
        for causal, line in ((False, "-"), (True, "--")):
            points = sorted((t.seqlen, t.ratio) for t in timings
                            if t.mode == mode and t.causal == causal)
            if points:
                time.plot(*zip(*points, strict=True), line, marker=marker,
                          label=f"{mode.replace('_', ' + ')}, {'causal' if causal else 'full'}")
    time.axhline(1.0, color="gray", linewidth=0.8)
    time.set(title="Time, ckpt_attn (torch backend) / SDPA", xlabel="sequence length S",
             ylabel="time ratio (above 1: slower than SDPA)", xscale="log")
    time.legend(fontsize=8)
    rows = sorted((r for r in saved if not r.causal), key=lambda r: r.seqlen)
    for name, style in (("ckpt_attn", "o-"), ("sdpa", "s:"), ("naive", "^-")):
        memory.plot([r.seqlen for r in rows], [getattr(r, name) / MIB for r in rows], style,
                    markersize=9 if name == "ckpt_attn" else 5,
                    label=name if name != "sdpa" else "SDPA (CPU)")
    memory.set(title="Kept for backward by one call (not causal)", xlabel="sequence length S",
               ylabel="MiB (log scale)", xscale="log", yscale="log")
    memory.legend(fontsize=8)
    for ax, seqlens in ((time, {t.seqlen for t in timings}), (memory, {r.seqlen for r in rows})):
        ax.set_xticks(sorted(seqlens), [str(s) for s in sorted(seqlens)])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
