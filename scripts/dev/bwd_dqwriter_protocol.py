#!/usr/bin/env python3
"""Randomized model of the synchronization protocol of backward kernel 5 (cuda/ffa_bwd_dqwriter.cu),
written without a GPU to check the design before a run. Each role (loader, two consumer warpgroups, two
dQ writer warps that walk their consumer's steps and count them) is the kernel's sequence of barrier
operations and buffer accesses; roles advance one operation at a time in random order. Named barriers
follow the hardware rule (bar.sync and bar.arrive both count threads; the barrier completes at its count
and releases the syncing threads), mbarriers complete a phase at their arrival count. Checks: no
deadlock, no barrier over-arrival, none left with arrivals at exit, and no buffer (Q/dO stage, dS^T
halves, dQ staging) overwritten while a reader may still read it, nor a staged step reduced as another.
It mirrors the kernel by hand: change both together.
    python3 scripts/dev/bwd_dqwriter_protocol.py [seed] [mutation ...]
    python3 scripts/dev/bwd_dqwriter_protocol.py --mutations   (each mutation must fail; CTest runs this)
Mutations: noparity (one dS barrier per warpgroup), earlyempty (release the stage before the GEMMs that
read it are waited for), writerorder (writer syncs before it frees), writersteps (the writer walks one
step fewer than its consumer)."""
import random
import sys

from protocol_model import MBar, NamedBarrier, protocol_main


def steps_of(nsteps):
    return list(range(nsteps))


MUT = set(sys.argv[2:])


def simulate(nsteps, rng):
    B = {}
    B['epi'] = NamedBarrier(256)
    for w in range(2):
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
    inflight = [[], []]              # consumer w: list of (kind, step) GEMMs not yet waited

    def consumer(w):
        for n in steps_of(nsteps):
            s = n & 1
            yield ('wait_full', s, n)
            assert stage_data[s] == n, f"consumer {w} step {n}: stage {s} holds {stage_data[s]}"
            stage_readers[s].add(w)
            inflight[w].append(('sdp', n))
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
            yield ('sync', ('dqf', w), 128)
        yield ('sync', 'epi', 128)  # no end marker: the writer counts the steps

    def writer_handoff(w):  # staging free (the previous rows were read), then the next rows staged
        if 'writerorder' in MUT:
            yield ('sync', ('dqf', w), 32)
            yield ('sync', ('dqe', w), 32)
        else:
            yield ('sync', ('dqe', w), 32)
            yield ('sync', ('dqf', w), 32)

    def writer(w):  # walks its consumer's steps and knows their count
        for n in range(nsteps - 1 if 'writersteps' in MUT else nsteps):
            staging_busy[w] = False
            yield from writer_handoff(w)
            assert staging_step[w] == n, f"writer {w} step {n}: staging holds step {staging_step[w]}"
            staging_busy[w] = True  # bulk reductions read the staging buffer until wait_group.read
            yield ('work',)
        staging_busy[w] = False  # bulk_wait before the writer exits

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


MUTATIONS = ['noparity', 'earlyempty', 'writerorder', 'writersteps']


def run_all(seed):
    rng = random.Random(seed)
    trials = 0
    for nsteps in [0, 1, 2, 3, 4, 5, 8, 13]:
        for _ in range(800):
            simulate(nsteps, rng)
            trials += 1
    return trials


def main():
    protocol_main(run_all, MUTATIONS, MUT)


if __name__ == "__main__":
    main()
