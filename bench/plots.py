"""PNG plots of a bench run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {
    "floor": "#888888",
    "dev": "#1f77b4",
    "cluster": "#2ca02c",
    "socketio": "#d62728",
    "socketio-redis": "#ff9896",
}


SHORT = {
    "floor": "F",
    "dev": "dev",
    "cluster": "cluster",
    "socketio": "Socket.IO",
    "socketio-redis": "Socket.IO+Redis",
    "floor-coalesce": "F+coalesce",
    "floor-sansio": "F sans-I/O",
    "dev-history32": "dev hist=32",
    "dev-gc": "dev lazy GC",
}


def _short(name: str) -> str:
    return SHORT.get(name, name)


def _bar_labels(ax: Any, bars: Any, fmt: str) -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(
            fmt.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=8,
        )


def draw(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Draw what the results allow; return {scenario: file name relative to out_dir}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results.get("scenarios", {})
    made: dict[str, str] = {}

    relay = (sc.get("relay") or {}).get("systems") or {}
    if relay:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(relay)
        labels = [_short(n) for n in names]
        colors = [COLORS.get(n, "#9467bd") for n in names]
        bars = a1.bar(labels, [relay[n]["max"]["cpu_us_per_unit"] for n in names], color=colors)
        _bar_labels(a1, bars, "{:.1f}")
        floor = relay.get("floor", {}).get("max", {}).get("cpu_us_per_unit")
        if floor:
            a1.axhline(1.25 * floor, ls="--", c="#1f77b4", lw=1, label="1.25 F (dev target)")
            a1.axhline(1.67 * floor, ls=":", c="#2ca02c", lw=1, label="1.67 F (cluster target)")
            a1.legend(fontsize=8)
        a1.set_title("server CPU per relayed message (max load)")
        a1.set_ylabel("microseconds")
        p50 = [(relay[n]["half"].get("latency_ms") or {}).get("p50", 0) for n in names]
        p99 = [(relay[n]["half"].get("latency_ms") or {}).get("p99", 0) for n in names]
        x = range(len(names))
        a2.bar([i - 0.2 for i in x], p50, 0.4, label="p50", color="#aec7e8")
        bars = a2.bar([i + 0.2 for i in x], p99, 0.4, label="p99", color="#1f77b4")
        _bar_labels(a2, bars, "{:.1f}")
        a2.axhline(5.0, ls="--", c="k", lw=1, label="5 ms target")
        a2.set_xticks(list(x), labels)
        a2.set_title("relay latency at 50% of max load")
        a2.set_ylabel("ms")
        a2.legend(fontsize=8)
        for ax in (a1, a2):
            ax.tick_params(axis="x", labelsize=8, labelrotation=30)
        fig.tight_layout()
        fig.savefig(out_dir / "perf-relay.png", dpi=110)
        plt.close(fig)
        made["relay"] = "perf-relay.png"

    calls = (sc.get("calls") or {}).get("systems") or {}
    if calls:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(calls)
        labels = [_short(n) for n in names]
        colors = [COLORS.get(n, "#9467bd") for n in names]
        bars = a1.bar(
            labels, [calls[n]["max"]["cpu_us_per_unit"] / 1000 for n in names], color=colors
        )
        _bar_labels(a1, bars, "{:.2f}")
        a1.set_title("server CPU per call setup (max load)")
        a1.set_ylabel("ms CPU per call")
        x = range(len(names))
        p50 = [(calls[n]["half"].get("setup_ms") or {}).get("p50", 0) for n in names]
        p99 = [(calls[n]["half"].get("setup_ms") or {}).get("p99", 0) for n in names]
        a2.bar([i - 0.2 for i in x], p50, 0.4, label="p50", color="#ffbb78")
        bars = a2.bar([i + 0.2 for i in x], p99, 0.4, label="p99", color="#ff7f0e")
        _bar_labels(a2, bars, "{:.1f}")
        a2.set_xticks(list(x), labels)
        a2.set_title("setup time at 50% of max load")
        a2.set_ylabel("ms")
        a2.legend(fontsize=8)
        for ax in (a1, a2):
            ax.tick_params(axis="x", labelsize=8, labelrotation=30)
        fig.tight_layout()
        fig.savefig(out_dir / "perf-calls.png", dpi=110)
        plt.close(fig)
        made["calls"] = "perf-calls.png"

    idle = (sc.get("idle") or {}).get("systems") or {}
    if idle:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(idle)
        bars = ax.bar(
            [idle[n]["label"].split(" (")[0] for n in names],
            [idle[n]["bytes_per_conn"] / 1024 for n in names],
            color=[COLORS.get(n, "#9467bd") for n in names],
        )
        _bar_labels(ax, bars, "{:.1f}")
        ax.axhline(18, ls="--", c="k", lw=1, label="18 KiB target")
        ax.set_ylabel("KiB server RSS per idle connection")
        ax.set_title(f"idle connections ({(sc.get('idle') or {}).get('conns')} per system)")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "perf-idle.png", dpi=110)
        plt.close(fig)
        made["idle"] = "perf-idle.png"

    growth = (sc.get("growth") or {}).get("systems") or {}
    if growth:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, s in growth.items():
            label = _short(name)
            rooms = [p for p in s["points"] if p["axis"] == "rooms"]
            members = [p for p in s["points"] if p["axis"] == "members"]
            color = COLORS.get(name, "#9467bd")
            if rooms:
                a1.plot(
                    [p["rooms"] for p in rooms],
                    [p["cpu_us_per_unit"] for p in rooms],
                    "o-",
                    label=label,
                    color=color,
                )
            if members:
                a2.plot(
                    [p["members"] for p in members],
                    [p["cpu_us_per_unit"] for p in members],
                    "o-",
                    label=label,
                    color=color,
                )
        a1.set_xscale("log")
        a1.set_xlabel("rooms (2 members each)")
        a2.set_xlabel("members per room (10 rooms, broadcast)")
        for ax in (a1, a2):
            ax.set_ylabel("server CPU us per delivered message")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "perf-growth.png", dpi=110)
        plt.close(fig)
        made["growth"] = "perf-growth.png"
    return made
