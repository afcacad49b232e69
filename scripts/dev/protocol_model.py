"""Shared pieces of the randomized protocol models of our kernels (scripts/dev/*_protocol.py): the two
hardware barriers as the models count them, and the command line that runs a model and its mutations.

Named barrier (bar.sync / bar.arrive): both count threads; at `count` the barrier completes and releases
the threads that synced. An mbarrier: `count` arrivals complete a phase and flip its parity bit.
"""
import sys


class NamedBarrier:
    def __init__(self, count, require_waiter=False):
        # require_waiter: a completion that releases nobody (arrives only) is a protocol error (a ring of
        # arrive -> sync hand-offs where two arrives of one round met).
        self.count, self.arrived, self.waiting, self.gen = count, 0, [], 0
        self.require_waiter = require_waiter

    def arrive(self, threads):
        self.arrived += threads
        assert self.arrived <= self.count, "over-arrival (an arrive counted for the wrong phase)"
        if self.arrived == self.count:
            self.arrived, self.gen = 0, self.gen + 1
            released, self.waiting = self.waiting, []
            assert released or not self.require_waiter, \
                "a named barrier completed with arrives only (two arrives of one round: the ring broke)"
            return released
        return []


class MBar:
    def __init__(self, count):
        self.count, self.arrived, self.phase = count, 0, 0

    def arrive(self):
        self.arrived += 1
        assert self.arrived <= self.count
        if self.arrived == self.count:
            self.arrived, self.phase = 0, self.phase ^ 1


def protocol_main(run_all, mutations, active):
    """`model.py [seed] [mutation ...]` runs the model (with the named mutations switched on);
    `model.py --mutations` (what CTest runs) checks that the unmutated protocol passes and that every
    mutation is caught (an assertion: a hazard or a deadlock). `active` is the set the model reads."""
    if sys.argv[1:] == ['--mutations']:
        print(f"{run_all(1)} random schedules: no deadlock, no hazard")
        caught = True
        for m in mutations:
            active.clear()
            active.add(m)
            try:
                run_all(1)
                print(f"mutation {m}: NOT caught")
                caught = False
            except AssertionError as e:
                print(f"mutation {m}: caught ({str(e).splitlines()[0][:100]})")
        print("protocol: OK" if caught else "protocol: a mutation was not caught")
        sys.exit(0 if caught else 1)
    trials = run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"{trials} random schedules: no deadlock, no hazard" + (f" (mutations {sorted(active)})" if active else ""))
