"""The chaos run: a real local cluster, many clients, random faults, then the judge.

    python -m tests.chaos.harness --seed 7 --seconds 60
    python -m tests.chaos.harness --minutes 30          # a random seed, printed first

1. Start ``signalpost cluster`` (2 edges, 3 brokers, 2 presence nodes, Consul; fast heartbeats;
   ``--restart``) in a work directory (node logs under ``cluster.json.logs/``).
2. Connect the clients, half on each edge; each joins 2-3 of the rooms (membership stays
   fixed from then on), so rooms are spread over the brokers and clients share rooms.
3. Every client sends numbered acked signals to each of its rooms, to one peer or the
   whole room, at a bounded rate, while one fault at a time is injected (``faults.py``),
   with recovery time between faults, until the fault time is over.
4. Settle: wait (bounded) until every node is up and every client is connected, stop
   sending, let outstanding requests finish; each client sends an acked marker to each of
   its rooms, and the run waits (bounded) until every target has every marker.
5. Judge the journal (``checker.check``) and print the seed, the faults, the counts and
   every violation with its history; the exit status is 1 when there are violations.

With ``--regions eu,us`` (and ``--wan-delay``) the cluster is ``signalpost cluster
--regions eu,us``: every region gets those edges, brokers and presence nodes, its Consul
datacenter and its WAN relay. Each client belongs to one region (alternately) and connects
to that region's edges; a room ``<region>-room-N`` is pinned to its home region
(``room_homes``: ``eu-*=eu,us-*=us``), the rooms' homes alternate between the regions, and
every room has members in both regions. The faults add ``region_kill`` and ``wan_reset``
(``faults.py``); when its region is down, a client resumes on an edge of another region
(its rooms homed there go on, those homed in the dead region are refused or unanswered
until it is back: counted, not violations) and moves home when its region is back.

With ``--rehome`` too, no rule pins the rooms: the clients of a room's named region join
first (so it is homed in its first member's region, agreed in Consul, as named), and
``region_loss_after`` is 2 s: a ``region_kill`` (3-6 s down) re-homes the rooms homed in
the killed region in the other one, and they stay there when it is back
(docs/multi-region.md, "Region loss"). The counts per home region are by the rooms' first
homes.

Everything is bounded in time; the cluster and the clients are stopped at the end
whatever happens. The same seed gives the same rooms, clients and fault sequence (the
timing of a real cluster still differs from run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from signalpost.placement import ranking
from tests.chaos.api_publisher import SENDER as API_SENDER
from tests.chaos.api_publisher import ApiPublisher
from tests.chaos.checker import FaultLog, Journal, SentSignal, Verdict, check, undelivered
from tests.chaos.faults import FAULT_WEIGHTS, REGION_FAULT_WEIGHTS, ChaosCluster, FaultInjector
from tests.chaos.workload import ChaosClient, Endpoint

#: Seconds the run waits for the cluster to be whole and every client connected.
SETTLE_TIMEOUT = 30.0
#: Seconds of calm after that, before the markers (membership changes, Consul, replicas).
SETTLE_CALM = 3.0
MARKER_ATTEMPTS = 3


#: ``region_loss_after`` with ``--rehome``: below ``REGION_DOWN``'s shortest outage.
REHOME_LOSS_AFTER = 2.0


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """One run's parameters."""

    seed: int
    seconds: float = 60.0  # time in which faults are injected
    clients: int = 16
    rooms: int = 8
    edges: int = 2
    brokers: int = 3
    presence: int = 2
    interval: tuple[float, float] = (0.2, 0.8)  # seconds between a client's signals per room
    depth: int = 2  # unanswered signals per (client, room)
    recovery: tuple[float, float] = (2.0, 4.0)  # seconds between faults
    max_faults: int = 1000
    request_timeout: float = 10.0
    marker_timeout: float = 15.0  # seconds to wait for every target to have every marker
    workdir: Path | None = None
    show: int = 10  # violations printed per kind (all go to the report file)
    weights: dict[str, int] = field(default_factory=lambda: dict(FAULT_WEIGHTS))
    regions: tuple[str, ...] = ()  # with two or more: the two-region cluster (see above)
    wan_delay: str = "40ms"
    rehome: bool = False  # rooms not pinned: homed by their first member, re-homed on a loss
    #: An app backend publishing into every room through the server API (``api_publisher``),
    #: one publish at a time per room, every ``api_interval`` seconds.
    api_publish: bool = True
    api_interval: tuple[float, float] = (0.3, 1.0)

    def home_of(self, room: str) -> str:
        """The region a room is pinned to, or (``rehome``) first homed in ("" without
        regions)."""
        region = room.split("-", 1)[0]
        return region if region in self.regions else ""


@dataclass(slots=True)
class Report:
    """What a run found."""

    config: ChaosConfig
    journal: Journal
    verdict: Verdict
    workdir: Path
    markers_missing: int
    errors: Counter[str]

    @property
    def ok(self) -> bool:
        return not self.verdict.violations

    def counts(self) -> dict[str, int]:
        signals = [s for s in self.journal.signals if not s.marker]
        return {
            "signals sent": len(signals),
            "signals acked": sum(s.acked_at is not None for s in signals),
            "signals refused": sum(s.refused is not None for s in signals),
            "signals not answered": sum(s.acked_at is None and s.refused is None for s in signals),
            "of them server API publishes": sum(s.sender == API_SENDER for s in signals),
            "server API publishes acked": sum(
                s.sender == API_SENDER and s.acked_at is not None for s in signals
            ),
            "markers acked": sum(s.acked_at is not None for s in self.journal.signals if s.marker),
            "markers missing": self.markers_missing,
            "receptions": len(self.journal.receptions),
            "deliveries checked": self.verdict.deliveries_checked,
            "deliveries exempt": self.verdict.exempt,
            "resumes": sum(c.number > 1 for c in self.journal.connections),
            "memberships lost with their room (recovered: false, no position)": sum(
                not r.member and not r.recovered for r in self.journal.recoveries
            ),
            "joins again after that": len(self.journal.rejoins),
            "faults injected": len(self.journal.faults),
            "violations": len(self.verdict.violations),
        }

    def region_counts(self) -> dict[str, str]:
        """Per home region: the signals sent to its rooms and what became of them."""
        out: dict[str, str] = {}
        for region in self.config.regions:
            signals = [
                s
                for s in self.journal.signals
                if not s.marker and self.config.home_of(s.room) == region
            ]
            acked = sum(s.acked_at is not None for s in signals)
            refused = sum(s.refused is not None for s in signals)
            unanswered = sum(s.acked_at is None and s.refused is None for s in signals)
            out[f"rooms homed in {region}"] = (
                f"{len(signals)} sent, {acked} acked, {refused} refused, {unanswered} not answered"
            )
        return out

    def render(self, *, show: int | None = None) -> str:
        """The report; ``show`` limits the violations printed per kind."""
        t0 = self.journal.t0
        lines = [f"chaos seed {self.config.seed} ({self.config.seconds:.0f} s of faults)"]
        lines.append(f"work directory: {self.workdir}")
        lines.append("faults:")
        lines += [f"  {f.describe(t0)}" for f in self.journal.faults]
        by_kind = Counter(f.kind for f in self.journal.faults)
        lines.append("faults by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
        lines += [
            f"note t={at - t0:.3f}: {text}" for at, who, text in self.journal.notes if who == "-"
        ]
        lines.append("counts:")
        lines += [f"  {name}: {value}" for name, value in self.counts().items()]
        lines += [f"  {name}: {value}" for name, value in self.region_counts().items()]
        if self.errors:
            errors = ", ".join(f"{k} {n}" for k, n in sorted(self.errors.items()))
            lines.append(f"  error replies: {errors}")
        kinds = self.verdict.by_kind()
        lines.append(
            "violations by kind: "
            + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")
        )
        printed: Counter[str] = Counter()
        for violation in self.verdict.violations:
            printed[violation.kind] += 1
            if show is None or printed[violation.kind] <= show:
                lines.append(violation.render(t0))
        hidden = sum(max(0, n - show) for n in printed.values()) if show is not None else 0
        if hidden:
            lines.append(f"({hidden} more violations in {self.workdir / 'report.txt'})")
        if self.verdict.violations:
            lines.append(f"FAILED: replay with --seed {self.config.seed}")
        else:
            lines.append(f"OK: no violations (seed {self.config.seed})")
        return "\n".join(lines)


def plan_rooms(
    rng: random.Random, clients: int, rooms: int, regions: tuple[str, ...] = ()
) -> dict[str, tuple[str, ...]]:
    """Client name -> its rooms: 2-3 each, every room with at least 3 members.

    With ``regions``: client ``i`` (from 0) is in region ``regions[i % len(regions)]``,
    room ``i`` is ``<regions[i % len(regions)]>-room-<i+1>``, and every room also has a
    member in each region."""
    names = [f"c{i:02d}" for i in range(1, clients + 1)]
    room_names = [
        f"{regions[i % len(regions)]}-room-{i + 1}" if regions else f"room-{i + 1}"
        for i in range(rooms)
    ]
    chosen: dict[str, set[str]] = {}
    for index, name in enumerate(names):
        first = room_names[index % rooms]
        others = [r for r in room_names if r != first]
        chosen[name] = {first, *rng.sample(others, rng.choice([1, 2]))}
    for room in room_names:
        while sum(room in r for r in chosen.values()) < min(3, clients):
            name = rng.choice([n for n in names if room not in chosen[n]])
            chosen[name].add(room)
    for room in room_names if regions else []:
        for index in range(len(regions)):
            of_region = names[index :: len(regions)]
            if of_region and not any(room in chosen[n] for n in of_region):
                chosen[rng.choice(of_region)].add(room)
    return {name: tuple(sorted(rooms_of)) for name, rooms_of in chosen.items()}


async def run(config: ChaosConfig, *, out: Callable[[str], None] = print) -> Report:
    """One chaos run; ``out`` gets progress lines and the report."""
    rng = random.Random(config.seed)
    out(f"chaos seed {config.seed}")
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="signalpost-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    journal = Journal(time.monotonic())

    def clock() -> float:
        return time.monotonic()

    def elapsed() -> str:
        return f"t={clock() - journal.t0:.1f}"

    env = {"SIGNALPOST_ROOM_CAPACITY": str(config.clients)}
    if config.regions and not config.rehome:
        env["SIGNALPOST_ROOM_HOMES"] = ",".join(f"{r}-*={r}" for r in config.regions)
    elif config.rehome:
        env["SIGNALPOST_REGION_LOSS_AFTER"] = str(REHOME_LOSS_AFTER)
    cluster = ChaosCluster(
        workdir,
        edges=config.edges,
        brokers=config.brokers,
        presence=config.presence,
        env=env,
        regions=config.regions,
        wan_delay=config.wan_delay,
    )
    clients: list[ChaosClient] = []
    senders: list[asyncio.Task[None]] = []
    errors: Counter[str] = Counter()
    markers_missing = 0
    try:
        cluster.launch()
        await cluster.ready()
        out(f"{elapsed()} cluster up in {workdir}")
        edges = [Endpoint(p["id"], p["url"], p.get("region", "")) for p in cluster.of_kind("edge")]
        broker_ids = {p["url"]: p["id"] for p in cluster.of_kind("broker")}
        membership = plan_rooms(rng, config.clients, config.rooms, config.regions)
        for index, (name, rooms) in enumerate(membership.items()):
            if config.regions:  # the client's region, then one of its edges
                region = config.regions[index % len(config.regions)]
                own = [i for i, e in enumerate(edges) if e.region == region]
                home = own[(index // len(config.regions)) % len(own)]
            else:
                home = index % len(edges)
            clients.append(
                ChaosClient(
                    name,
                    rooms,
                    edges,
                    home,
                    journal,
                    clock,
                    request_timeout=config.request_timeout,
                )
            )
        members: dict[str, list[ChaosClient]] = {}
        for client in clients:
            for room in client.rooms:
                members.setdefault(room, []).append(client)
        for room, in_room in sorted(members.items()):
            brokers = [
                p["url"]
                for p in cluster.of_kind("broker")
                if p.get("region", "") == config.home_of(room)
            ]
            order = [broker_ids[b] for b in ranking(room, brokers)]
            out(f"  {room}: owner {order[0]}, runner-up {order[1]}; {[c.name for c in in_room]}")
        await asyncio.gather(*(c.connect() for c in clients))
        if config.rehome:  # the named region's members first: the room is homed there
            await asyncio.gather(*(c.join_rooms(first_of=c.edges[c.home].region) for c in clients))
        await asyncio.gather(*(c.join_rooms() for c in clients))
        out(f"{elapsed()} {len(clients)} clients joined {len(members)} rooms")

        stop = asyncio.Event()
        senders += [
            asyncio.create_task(
                client.run_room(
                    room,
                    [p for p in members[room] if p is not client],
                    stop,
                    random.Random(rng.getrandbits(64)),
                    interval=config.interval,
                    depth=config.depth,
                )
            )
            for client in clients
            for room in client.rooms
        ]
        publisher = None
        if config.api_publish:
            # Its own generator: the seed draws the same rooms, clients and faults as without.
            publisher = ApiPublisher(edges, journal, clock, random.Random(config.seed ^ 0x5E4))
            senders += [
                asyncio.create_task(
                    publisher.run_room(room, members[room], stop, interval=config.api_interval)
                )
                for room in sorted(members)
            ]
        injector = FaultInjector(cluster, clients, rng, clock, config.weights)
        end = clock() + config.seconds
        await asyncio.sleep(min(2.0, config.seconds))  # traffic before the first fault
        while config.weights and clock() < end and len(journal.faults) < config.max_faults:
            fault = await injector.inject()
            journal.faults.append(fault)
            out(f"{elapsed()} fault {fault.describe(journal.t0)}")
            await asyncio.sleep(min(rng.uniform(*config.recovery), max(0.0, end - clock())))

        await asyncio.sleep(max(0.0, end - clock()))  # with no faults: traffic only
        out(f"{elapsed()} faults over; settling")
        await _settle(cluster, clients, journal, clock)
        stop.set()
        await asyncio.wait(senders, timeout=config.request_timeout + 5)
        if publisher is not None:
            journal.note(
                clock(),
                "-",
                f"server API: {publisher.attempts} attempts, {publisher.retried} publishes "
                f"answered only on a later attempt, refusals {publisher.errors or 'none'}",
            )
        out(f"{elapsed()} sending markers")
        await asyncio.gather(*(_send_markers(c, members) for c in clients if not c.lost))
        deadline = clock() + config.marker_timeout
        # The condition spans every client's journal: polled twice a second, bounded.
        while (missing := undelivered(journal)) and clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        markers_missing = len(missing)
        out(f"{elapsed()} markers in ({markers_missing} missing); judging")
        errors.update(s.refused for s in journal.signals if s.refused)
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for client in clients:
            client.stopping = True
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await cluster.stop()
    verdict = check(journal, rooms_may_be_lost="region_kill" in config.weights)
    report = Report(config, journal, verdict, workdir, markers_missing, errors)
    (workdir / "report.txt").write_text(report.render() + "\n")
    out(report.render(show=config.show))
    return report


async def _settle(
    cluster: ChaosCluster,
    clients: list[ChaosClient],
    journal: Journal,
    clock: Callable[[], float],
) -> None:
    """Wait (bounded) for a whole cluster and connected clients, then a calm moment."""
    deadline = clock() + SETTLE_TIMEOUT
    while clock() < deadline:
        if await cluster.whole() and all(c.ready or c.lost for c in clients):
            break
        await asyncio.sleep(0.2)
    else:
        journal.faults.append(
            FaultLog("settle", "-", clock(), detail="cluster or clients not back in time")
        )
    await asyncio.sleep(SETTLE_CALM)
    # Not waited for (it needs no fault to go wrong), but a cluster routes by what it shows.
    passing = await cluster.passing()
    expected = {kind: sorted(p["id"] for p in cluster.of_kind(kind)) for kind in passing}
    if passing != expected:
        missing = {k: sorted(set(expected[k]) - set(v)) for k, v in passing.items()}
        shown = ", ".join(f"{k}: {', '.join(v)}" for k, v in missing.items() if v)
        journal.note(clock(), "-", f"after settling, Consul does not list as passing: {shown}")


async def _send_markers(client: ChaosClient, members: dict[str, list[ChaosClient]]) -> None:
    """One acked marker per room of ``client`` (a few tries: only an acked one counts)."""

    async def one(room: str) -> SentSignal | None:
        peers = [p for p in members[room] if p is not client]
        for _ in range(MARKER_ATTEMPTS):
            marker = await client.send_signal(room, None, peers, marker=True)
            if marker.acked_at is not None or client.lost:
                return marker
        return None

    await asyncio.gather(*(one(room) for room in client.rooms))


def main(argv: list[str] | None = None) -> int:
    """Command line: run once, print the report, exit 1 on violations."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.harness", description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None, help="fault time (default 60)")
    length.add_argument("--minutes", type=float, default=None, help="fault time in minutes")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rooms", type=int, default=8)
    parser.add_argument(
        "--regions", default="", help="e.g. eu,us: a cluster of those regions (see above)"
    )
    parser.add_argument("--wan-delay", default="40ms", help="one-way WAN delay (--regions)")
    parser.add_argument(
        "--rehome",
        action="store_true",
        help="with --regions: rooms not pinned, re-homed when their region is killed",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--show", type=int, default=10, help="violations printed per kind")
    parser.add_argument(
        "--no-api", action="store_true", help="no server API publishes (clients' signals only)"
    )
    parser.add_argument(
        "--faults",
        default=None,
        help=f"fault kinds, comma separated, or none (default all: {','.join(FAULT_WEIGHTS)}, "
        f"and with --regions {','.join(REGION_FAULT_WEIGHTS)})",
    )
    args = parser.parse_args(argv)
    regions = tuple(r.strip() for r in args.regions.split(",") if r.strip())
    if len(regions) == 1 or len(set(regions)) != len(regions):
        parser.error("--regions wants two or more distinct regions")
    available = {**FAULT_WEIGHTS, **(REGION_FAULT_WEIGHTS if regions else {})}
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    seconds = 60.0
    if args.seconds is not None:
        seconds = args.seconds
    elif args.minutes is not None:
        seconds = args.minutes * 60
    faults = args.faults if args.faults is not None else ",".join(available)
    kinds = [k.strip() for k in faults.split(",") if k.strip() and k.strip() != "none"]
    unknown = set(kinds) - set(available)
    if unknown:
        parser.error(f"unknown fault kinds: {sorted(unknown)}")
    config = ChaosConfig(
        seed=seed,
        seconds=seconds,
        clients=args.clients,
        rooms=args.rooms,
        workdir=args.workdir,
        show=args.show,
        weights={k: available[k] for k in kinds},
        regions=regions,
        wan_delay=args.wan_delay,
        rehome=args.rehome and bool(regions),
        api_publish=not args.no_api,
    )
    try:
        report = asyncio.run(run(config))
    except KeyboardInterrupt:
        print(f"interrupted; seed {seed}", file=sys.stderr)
        return 130
    except Exception:
        print(f"the harness failed; seed {seed}", file=sys.stderr)
        raise
    return 0 if report.ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
