#!/usr/bin/env python3
"""Randomized model of the synchronization protocol of backward kernels 4/5 (cuda/ffa_bwd_pingpong.cu),
written without a GPU to check the design before its first run. Kernel 4: ping-pong issue order, dQ jobs
through a job slot ended by a marker; kernel 5: neither (its writers walk the consumers' steps and count
them). Each role (loader, two consumer warpgroups, two dQ writer warps) is the kernel's sequence of
barrier operations and buffer accesses;
roles advance one operation at a time in random order. Named barriers follow the hardware rule (bar.sync
and bar.arrive both count threads; the barrier completes at its count and releases the syncing threads),
mbarriers complete a phase at their arrival count. Checks: no deadlock, no barrier over-arrival, none
left with arrivals at exit, and no buffer (Q/dO stage, dS^T halves, dQ staging, job slot) overwritten
while a reader may still read it. It mirrors the kernel by hand: change both together.
    python3 scripts/dev/bwd_pingpong_protocol.py [seed] [mutation ...]
Mutations (each must fail): noparity (one dS barrier per warpgroup), nofinalsched (kernel 4), earlyempty
(release the stage before the GEMMs that read it are waited for), writerorder (writer syncs before it
frees), writersteps (kernel 5: the writer walks one step fewer than its consumer)."""
import random
import sys


class NamedBarrier:
    def __init__(self, count):
        self.count, self.arrived, self.waiting, self.gen = count, 0, [], 0

    def arrive(self, threads):
        self.arrived += threads
        assert self.arrived <= self.count, "over-arrival (an arrive counted for the wrong phase)"
        if self.arrived == self.count:
            self.arrived, self.gen = 0, self.gen + 1
            released, self.waiting = self.waiting, []
            return released
        return []


class MBar:
    def __init__(self, count):
        self.count, self.arrived, self.phase = count, 0, 0

    def arrive(self):
        self.arrived += 1
        if self.arrived == self.count:
            self.arrived, self.phase = 0, self.phase ^ 1


def steps_of(nsteps):
    return list(range(nsteps))


MUT = set(sys.argv[2:])


def simulate(nsteps, kernel, rng):
    pingpong = job_slot = kernel == 4
    B = {}
    B['epi'] = NamedBarrier(256)
    for w in range(2):
        B[('sched', w)] = NamedBarrier(256)
        B[('dqf', w)] = NamedBarrier(160)
        B[('dqe', w)] = NamedBarrier(160)
        for par in range(2):
            B[('ds', w, par)] = NamedBarrier(256)
    empty = [MBar(2), MBar(2)]  # 256 consumer threads in the kernel; here one arrival per warpgroup
    # buffer state
    stage_data = [None, None]        # which step's Q/dO/stats occupy stage s
    stage_readers = [set(), set()]   # consumers with GEMM reads in flight on stage s
    ds_readers = [set(), set()]      # (wg) with dQ GEMM in flight reading ds buffer b
    ds_written = [[None, None], [None, None]]  # ds[b][w] = step written
    staging_busy = [False, False]    # writer w's reductions may still read staging w
    staging_step = [None, None]
    slot = [None, None]
    slot_read = [True, True]
    inflight = [[], []]              # consumer w: list of (kind, step) GEMMs not yet waited

    def consumer(w):
        if pingpong and w == 1:
            yield ('arrive', ('sched', 0), 128)
        for n in steps_of(nsteps):
            s = n & 1
            yield ('wait_full', s, n)
            assert stage_data[s] == n, f"consumer {w} step {n}: stage {s} holds {stage_data[s]}"
            if pingpong:
                yield ('sync', ('sched', w), 128)
            stage_readers[s].add(w)
            inflight[w].append(('sdp', n))
            if pingpong:
                yield ('arrive', ('sched', 1 - w), 128)
            yield ('work',)
            # write own half of dS^T into buffer s
            for rw in ds_readers[s]:
                raise AssertionError(f"consumer {w} step {n}: writes ds[{s}] while consumer {rw}'s dQ may read it")
            ds_written[s][w] = n
            yield ('arrive', ('ds', w, 0 if 'noparity' in MUT else s), 128)
            inflight[w].append(('dvdk', n))
            yield ('sync', ('ds', 1 - w, 0 if 'noparity' in MUT else s), 128)
            assert ds_written[s][1 - w] == n, f"consumer {w} step {n}: other half of ds[{s}] is step {ds_written[s][1 - w]}"
            ds_readers[s].add(w)
            inflight[w].append(('dq', n))
            yield ('work',)
            if 'earlyempty' in MUT:
                yield ('arrive_empty', s)
                yield ('work',)
            # wait<0>: all GEMMs complete
            inflight[w].clear()
            ds_readers[s].discard(w)
            stage_readers[s].discard(w)
            if 'earlyempty' not in MUT:
                yield ('arrive_empty', s)
            yield ('sync', ('dqe', w), 128)
            assert not staging_busy[w], f"consumer {w} step {n}: staging still read by the writer"
            staging_step[w] = n
            if job_slot:
                assert slot_read[w], f"consumer {w} step {n}: slot not yet read"
                slot[w] = ('job', n)
                slot_read[w] = False
            yield ('sync', ('dqf', w), 128)
        if job_slot:  # the end marker
            yield ('sync', ('dqe', w), 128)
            assert slot_read[w]
            slot[w] = ('end',)
            slot_read[w] = False
            yield ('sync', ('dqf', w), 128)
        if pingpong and w == 0 and 'nofinalsched' not in MUT:
            yield ('sync', ('sched', 0), 128)
        yield ('sync', 'epi', 128)

    def writer_handoff(w):  # staging free (the previous rows were read), then the next rows staged
        if 'writerorder' in MUT:
            yield ('sync', ('dqf', w), 32)
            yield ('sync', ('dqe', w), 32)
        else:
            yield ('sync', ('dqe', w), 32)
            yield ('sync', ('dqf', w), 32)

    def writer(w):
        if not job_slot:  # kernel 5: the writer walks its consumer's steps and knows their count
            for n in range(nsteps - 1 if 'writersteps' in MUT else nsteps):
                staging_busy[w] = False
                yield from writer_handoff(w)
                assert staging_step[w] == n, f"writer {w} step {n}: staging holds step {staging_step[w]}"
                staging_busy[w] = True
                yield ('work',)
            staging_busy[w] = False  # bulk_wait before the writer exits
            return
        while True:
            staging_busy[w] = False
            yield from writer_handoff(w)
            job = slot[w]
            slot_read[w] = True
            if job[0] == 'end':
                return
            assert staging_step[w] == job[1]
            staging_busy[w] = True  # bulk reductions read the staging buffer until wait_group.read
            yield ('work',)

    def loader():
        for n in steps_of(nsteps):
            s = n & 1
            if n >= 2:
                yield ('wait_empty', s, ((n >> 1) - 1) & 1)
            assert not stage_readers[s], f"loader step {n}: stage {s} still read by {stage_readers[s]}"
            stage_data[s] = n
            yield ('fill', s)

    roles = {'c0': consumer(0), 'c1': consumer(1), 'w0': writer(0), 'w1': writer(1), 'ld': loader()}
    pending = {name: None for name in roles}   # the op a role is blocked on
    blocked_on_named = {}                      # name -> barrier key
    full_count = [0, 0]                        # completed phases of full[s] (the loader's fills)
    done = set()

    def ready(name):
        op = pending[name]
        if op is None:
            return True
        kind = op[0]
        if kind == 'sync':
            return False  # released by the barrier
        if kind == 'wait_full':
            s, n = op[1], op[2]
            return full_count[s] > (n >> 1)
        if kind == 'wait_empty':
            s, parity = op[1], op[2]
            return empty[s].phase != parity
        return True

    steps = 0
    while len(done) < len(roles):
        runnable = [r for r in roles if r not in done and ready(r)]
        if not runnable:
            raise AssertionError(f"deadlock: pending {pending}, barrier counts "
                                 f"{ {k: b.arrived for k, b in B.items() if b.arrived} }")
        name = rng.choice(runnable)
        pending[name] = None
        try:
            op = next(roles[name])
        except StopIteration:
            done.add(name)
            continue
        kind = op[0]
        if kind == 'arrive':
            for waiter in B[op[1]].arrive(op[2]):
                pending[waiter] = None
        elif kind == 'sync':
            bar = B[op[1]]
            bar.waiting.append(name)
            released = bar.arrive(op[2])
            if name not in released:
                pending[name] = op
            for waiter in released:
                pending[waiter] = None
        elif kind == 'wait_full' or kind == 'wait_empty':
            pending[name] = op
            if ready(name):
                pending[name] = None
        elif kind == 'arrive_empty':
            empty[op[1]].arrive()
        elif kind == 'fill':
            full_count[op[1]] += 1
        steps += 1
    left = {k: b.arrived for k, b in B.items() if b.arrived}
    assert not left, f"barriers left with arrivals at exit: {left}"
    return steps


def main():
    rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    trials = 0
    for nsteps in [0, 1, 2, 3, 4, 5, 8, 13]:
        for kernel in (4, 5):
            for _ in range(400):
                simulate(nsteps, kernel, rng)
                trials += 1
    print(f"{trials} random schedules: no deadlock, no hazard" + (f" (mutations {sorted(MUT)})" if MUT else ""))


if __name__ == "__main__":
    main()
