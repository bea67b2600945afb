"""A simulation, not a measurement: a fleet partitioned over N managers, and what a manager
leaving or joining costs (docs/scaling.md).

No broker, no manager, no sockets: node ids are hashed the way each partitioning scheme of
docs/scaling.md would route them, and the printed figures are counts and times that follow from
the schemes' arithmetic, not from running fleetmq.

- ``modulo``: ``hash(node) mod N`` over the list of live members, the shape of EMQX's
  ``hash_clientid`` shared-subscription strategy (``1 + erlang:phash2(ClientId) rem Count``).
  Erlang's ``phash2`` is not reproduced: any uniform hash moves the same share of nodes.
- ``consistent``: a hash ring with ``--vnodes`` points per member. No broker here offers it;
  it is the yardstick a modulo is compared with.
- ``buckets``: a fixed number of buckets (``FNV-1a 32 mod --buckets``, the function of NATS's
  ``{{partition(n, token)}}`` subject mapping), each bucket owned whole by one member; a member
  that leaves hands its buckets to the least loaded, a member that joins takes buckets from the
  most loaded.
- ``round-robin``: Mosquitto's ``$share`` gives each message to the next member in turn. With a
  fleet's heartbeats interleaved, which member gets a given node's next heartbeat is modelled as
  a uniform draw; each member keeps its own ``last_seen`` per node and its own deadline
  (``last_seen + timeout``, a heartbeat arriving at the deadline counts as heard).

The handover of a moved node follows the contract's grace rule (section 3): the new owner reads
the node's ``last_seen`` from the shared store (written behind, up to ``--flush-interval`` old)
and gives it ``max(last_seen, takeover) + timeout``. Nodes that fell silent when the member left
are the ones whose verdict the grace holds back; the table says by how much.

    python bench/partition_sim.py --nodes 1000000 --managers 4
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import print_rows, print_table, write_result

Owner = Callable[[int], str]
"""Node index -> the member that owns it."""


def fnv1a32(data: bytes) -> int:
    """FNV-1a, 32 bits: what NATS's ``partition()`` mapping hashes a subject token with."""
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def members(count: int, start: int = 0) -> list[str]:
    return [f"m{i}" for i in range(start, start + count)]


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


class Modulo:
    def __init__(self, hashes: Sequence[int]) -> None:
        self.hashes = hashes

    def owners(self, live: list[str]) -> list[str]:
        return [live[h % len(live)] for h in self.hashes]


class Ring:
    def __init__(self, hashes: Sequence[int], vnodes: int) -> None:
        self.hashes = hashes
        self.vnodes = vnodes

    def owners(self, live: list[str]) -> list[str]:
        points = sorted((hash64(f"{m}#{v}"), m) for m in live for v in range(self.vnodes))
        keys = [p for p, _ in points]
        return [points[bisect.bisect(keys, h) % len(points)][1] for h in self.hashes]


class Buckets:
    """Fixed buckets, each owned whole; only a leaving or joining member's buckets move."""

    def __init__(self, buckets: Sequence[int], count: int) -> None:
        self.buckets = buckets
        self.count = count
        self.table: dict[int, str] = {}

    def owners(self, live: list[str]) -> list[str]:
        if not self.table:
            self.table = {b: live[b % len(live)] for b in range(self.count)}
        else:
            self._rebalance(live)
        return [self.table[b] for b in self.buckets]

    def _rebalance(self, live: list[str]) -> None:
        held: dict[str, list[int]] = {m: [] for m in live}
        orphans: list[int] = []
        for bucket, owner in sorted(self.table.items()):
            held.get(owner, orphans).append(bucket)
        for bucket in orphans:  # a member left: the least loaded take its buckets
            taker = min(live, key=lambda m: (len(held[m]), m))
            held[taker].append(bucket)
        fair = self.count // len(live)
        for newcomer in (m for m in live if not held[m]):  # a member joined
            while len(held[newcomer]) < fair:
                giver = max(live, key=lambda m: (len(held[m]), m))
                held[newcomer].append(held[giver].pop())
        self.table = {b: m for m, bs in held.items() for b in bs}


@dataclass(frozen=True)
class Change:
    name: str
    before: list[str]
    after: list[str]


def move(scheme: Any, change: Change) -> tuple[list[str], list[str]]:
    return scheme.owners(change.before), scheme.owners(change.after)


def balance(owners: list[str]) -> float:
    counts = Counter(owners)
    return max(counts.values()) / (len(owners) / len(counts))


def handover(moved: int, takeover: float, args: argparse.Namespace,
             rng: random.Random) -> dict[str, float]:
    """Moved nodes that fall silent at t = 0, when their owner dies (or hands them over), with
    the new owner acting from ``takeover``: how much later than its own deadline each one is
    declared offline. The store's ``last_seen`` misses a heartbeat younger than the flush."""
    held = []
    for _ in range(min(moved, args.samples)):
        last_heard = -rng.uniform(0, args.interval)  # its last heartbeat before t = 0
        stored = last_heard if last_heard < -args.flush_interval else last_heard - args.interval
        deadline = max(stored, takeover) + args.timeout
        held.append(deadline - (last_heard + args.timeout))
    return {"takeover_s": takeover, "held_p50_s": percentile(held, 0.5),
            "held_max_s": max(held, default=0.0), "silent_deadline_s": takeover + args.timeout}


def round_robin(args: argparse.Namespace, managers: int, rng: random.Random) -> dict[str, float]:
    """Every node alive for ``--hours``; each heartbeat lands on a uniformly drawn member.
    A member that misses ``timeout / interval`` heartbeats in a row of a node (three by
    default; the last of them was due at its deadline) declares it offline, until the node's
    next heartbeat reaches that member."""
    beats = int(args.hours * 3600 / args.interval)
    missed_to_expire = int(args.timeout // args.interval)
    nodes_hit = verdicts = 0
    offline_s = 0.0
    for _ in range(args.rr_nodes):
        heard = [rng.randrange(managers) for _ in range(beats)]
        hit = False
        for member in range(managers):
            gap = 0
            for got in heard:
                if got != member:
                    gap += 1
                    if gap == missed_to_expire:  # this beat, due at the deadline, went elsewhere
                        verdicts += 1
                        hit = True
                else:
                    if gap >= missed_to_expire:  # offline from the deadline to this beat
                        offline_s += (gap + 1 - missed_to_expire) * args.interval
                    gap = 0
        nodes_hit += hit
    scale = 1 / args.rr_nodes
    return {"managers": managers, "nodes_falsely_offline_share": nodes_hit * scale,
            "false_verdicts_per_node_per_hour": verdicts * scale / args.hours,
            "false_offline_s_per_node_per_hour": offline_s * scale / args.hours,
            "analytic_run_share": ((managers - 1) / managers) ** missed_to_expire}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--managers", type=int, default=4, help="members before the change")
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--vnodes", type=int, default=128, help="ring points per member")
    parser.add_argument("--interval", type=float, default=60.0, help="heartbeat interval, s")
    parser.add_argument("--timeout", type=float, default=180.0, help="offline after, s")
    parser.add_argument("--takeover", type=float, default=2.0,
                        help="s from a member's death to its nodes' new owner acting")
    parser.add_argument("--flush-interval", type=float, default=1.0,
                        help="how old the store's last_seen may be (written behind)")
    parser.add_argument("--samples", type=int, default=100_000,
                        help="moved nodes sampled for the grace figures")
    parser.add_argument("--rr-nodes", type=int, default=20_000,
                        help="nodes replayed through round robin")
    parser.add_argument("--hours", type=float, default=1.0, help="round-robin replay length")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    n = args.managers

    ids = [f"sim-{i:06d}" for i in range(args.nodes)]
    hashes = [hash64(i) for i in ids]
    buckets = [fnv1a32(i.encode()) % args.buckets for i in ids]
    changes = [Change(f"a member leaves ({n} -> {n - 1})", members(n), members(n - 1)),
               Change(f"a member joins ({n} -> {n + 1})", members(n), members(n + 1))]
    # The member that leaves is the last: for modulo any one moves as many, for the others
    # which one does not matter either.

    print("SIMULATION (no broker, no manager): what follows from each scheme's arithmetic")
    print_rows([("nodes", f"{args.nodes:,}"), ("managers", f"{n}"),
                ("heartbeat interval / timeout", f"{args.interval:g} s / {args.timeout:g} s"),
                ("takeover after a death", f"{args.takeover:g} s"),
                ("store's last_seen", f"up to {args.flush_interval:g} s old")])
    print()
    rows: list[tuple[str, ...]] = []
    results: list[dict[str, Any]] = []
    for change in changes:
        for name, scheme in (("modulo (EMQX hash_clientid)", Modulo(hashes)),
                             (f"consistent ring, {args.vnodes} points", Ring(hashes, args.vnodes)),
                             (f"{args.buckets} buckets (NATS partition)",
                              Buckets(buckets, args.buckets))):
            before, after = move(scheme, change)
            moved = sum(a != b for a, b in zip(before, after, strict=True))
            fair = 1 / len(change.after) if len(change.after) > len(change.before) else (
                1 / len(change.before))
            takeover = args.takeover if len(change.after) < len(change.before) else 0.0
            grace = handover(moved, takeover, args, rng)
            rows.append((change.name, name, f"{moved:,}", f"{moved / args.nodes:.1%}",
                         f"{fair:.1%}", f"{balance(after):.2f}",
                         f"{grace['held_p50_s']:.1f} / {grace['held_max_s']:.1f} s"))
            results.append({"change": change.name, "scheme": name, "moved": moved,
                            "moved_share": moved / args.nodes, "least_possible_share": fair,
                            "max_over_mean_after": balance(after), **grace})
    print_table(("change", "scheme", "nodes moved", "share", "least possible",
                 "max/mean load after", "verdict held p50 / max"), rows)
    print(f"\nA moved node's deadline is max(store's last_seen, takeover) + timeout: every "
          f"moved node that stays silent falls due at one moment, {args.takeover:g} + "
          f"{args.timeout:g} s after a death ({args.timeout:g} s after a planned handover, "
          f"takeover 0), and 'verdict held' is how much later than its own deadline that is.")

    print(f"\nround robin ($share on Mosquitto), {args.rr_nodes:,} live nodes replayed for "
          f"{args.hours:g} h:")
    rr_rows: list[tuple[str, ...]] = []
    rr: list[dict[str, float]] = []
    for managers in (2, 3, 4):
        r = round_robin(args, managers, rng)
        rr.append(r)
        rr_rows.append((f"{managers} managers", f"{r['nodes_falsely_offline_share']:.1%}",
                        f"{r['false_verdicts_per_node_per_hour']:.2f}",
                        f"{r['false_offline_s_per_node_per_hour']:.0f} s",
                        f"{r['analytic_run_share']:.1%}"))
    print_table(("members", "live nodes declared offline", "false verdicts / node / h",
                 "offline at a member / node / h",
                 "P(run of misses) per beat, one member"), rr_rows)
    write_result("partition_sim", {"simulation": True, "nodes": args.nodes, "managers": n,
                                   "buckets": args.buckets, "interval_s": args.interval,
                                   "timeout_s": args.timeout, "takeover_s": args.takeover,
                                   "results": results, "round_robin": rr})


if __name__ == "__main__":
    main()
