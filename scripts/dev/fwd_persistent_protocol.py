#!/usr/bin/env python3
"""Randomized model of the synchronization protocol of forward kernels 3 and 5 (cuda/ffa_fwd_overlap.cu:
v8, and v10 = v8 on a persistent grid), written without a GPU to check kernel 5's cross-tile protocol before
its first run. One CTA: the producer thread, kNC consumer warpgroups (one arrival per warpgroup stands for
its four warps' arrivals) and the TMA unit (copies complete later, in any order). Kernel 3 runs one work
tile; kernel 5 a list of them (any number of key tiles each, 0 included) with the K/V ring position, the
mbarrier phases and the turn ring carried over. Named barriers follow the hardware rule (bar.sync and
bar.arrive both count threads; the barrier completes at its count and releases the syncing threads);
mbarrier waits are parity waits on a phase bit, as in hardware. Kernel 5 has two Q buffers (work tile j
uses buffer j % 2); a work tile's last P V is issued in the next work tile's first turn beside its S_0
(or on its own at the end, or before a work tile without keys), and its epilogue then stages through the
tile's Q buffer, which the consumers hand back to the producer afterwards (kernel 3: one buffer, never
handed back). Kernel 5's producer also stores each work tile's key-tile count in a slot per Q buffer
(slab tiles: the consumers walk the count it hands over) after its wait for that buffer and before the
Q load whose completion the consumers wait for; every consumer reads it after that wait. Checks: no deadlock; every named-barrier completion releases a waiting consumer (an arrive
never meets another arrive of the same round: the one-token ring); no barrier left with arrivals at exit;
a TMA never writes a Q, K or V buffer that a GEMM or an epilogue may still use; a GEMM reads the Q of its
own work tile and the K/V tile of its ring position; a consumer reads its own work tile's count, and no
count is stored over one that a consumer has still to read.
It mirrors the kernel by hand: change both together.
    python3 scripts/dev/fwd_persistent_protocol.py [seed] [mutation ...]
    python3 scripts/dev/fwd_persistent_protocol.py --mutations   (CTest ffa_fwd_protocol: all of the below)
Mutations (each must fail): pertile (kernel 5 starts and ends the turn ring every work tile), earlyq
(kernel 5 hands a Q buffer back before the epilogue that stages in it), noqwait (the producer loads Q
without waiting for empty_q), noparity (the K ring's waits use phase 0 always), oneq (kernel 5 with one Q
buffer under this protocol), earlycount (the producer stores a work tile's count before its wait for the
Q buffer)."""
import random
import sys

from protocol_model import MBar, NamedBarrier, protocol_main

MUTATIONS = ['pertile', 'earlyq', 'noqwait', 'noparity', 'oneq', 'earlycount']
MUT = set(a for a in sys.argv[2:] if a in MUTATIONS)


def simulate(kernel, nc, stages, tiles, rng):
    """tiles: key tiles per work tile of this CTA (kernel 3: exactly one work tile)."""
    persistent = kernel == 5
    qbufs = 2 if persistent and 'oneq' not in MUT else 1
    bars = {i: NamedBarrier(256, require_waiter=True) for i in range(1, nc + 1)}
    full_q, empty_q = [MBar(1) for _ in range(qbufs)], [MBar(nc) for _ in range(qbufs)]
    full_k, full_v = [MBar(1) for _ in range(stages)], [MBar(1) for _ in range(stages)]
    empty_k, empty_v = [MBar(nc) for _ in range(stages)], [MBar(nc) for _ in range(stages)]
    mb = {'full_q': full_q, 'empty_q': empty_q, 'full_k': full_k, 'full_v': full_v, 'empty_k': empty_k,
          'empty_v': empty_v}
    # Buffer contents ('w' while a TMA writes) and the consumers whose GEMMs or epilogues may still use them.
    data, readers = {}, {}
    for b in range(qbufs):
        data[('q', b)], readers[('q', b)] = None, set()
        data[('cnt', b)], readers[('cnt', b)] = None, set()  # kernel 5: the key-tile count slot
    for s in range(stages):
        for x in 'kv':
            data[(x, s)], readers[(x, s)] = None, set()
    tma = []  # copies in flight: (buffer, value, barrier list, index)

    def tma_load(buf, value, bar, idx):
        assert not readers[buf], f"TMA into {buf} (for {value}) while consumers {readers[buf]} may use it"
        data[buf] = 'w'
        tma.append((buf, value, bar, idx))

    def parity_wait(bar, idx, parity):
        return ('wait', bar, idx, parity)

    def producer():
        n = 0
        for j, nt in enumerate(tiles):
            def store_count(b):
                assert not readers[('cnt', b)], \
                    f"count of tile {j} stored over tile {data[('cnt', b)]}'s, unread by {readers[('cnt', b)]}"
                data[('cnt', b)], readers[('cnt', b)] = j, set(range(nc))

            def load_q():
                b = j % qbufs
                if persistent and 'earlycount' in MUT:
                    store_count(b)
                if persistent and j >= qbufs and 'noqwait' not in MUT:
                    yield parity_wait('empty_q', b, ((j // qbufs) - 1) & 1)
                if persistent and 'earlycount' not in MUT:
                    store_count(b)
                tma_load(('q', b), j, 'full_q', b)

            def load(x, pos):
                s = pos % stages
                if pos >= stages:
                    yield parity_wait('empty_' + x, s, 0 if 'noparity' in MUT and x == 'k' else ((pos // stages) - 1) & 1)
                tma_load((x, s), pos, 'full_' + x, s)

            if not persistent:
                yield from load_q()
            n_first = n
            for _ in range(nt):
                yield from load('k', n)
                if n > n_first:
                    yield from load('v', n - 1)
                elif persistent:
                    yield from load_q()
                n += 1
                yield ('work',)
            if n > n_first:
                yield from load('v', n - 1)
            elif persistent:
                yield from load_q()

    def consumer(c):
        last = nc - 1
        mine, nxt = 1 + c, 1 + (c + 1) % nc
        ring_per_tile = persistent and 'pertile' in MUT
        if not ring_per_tile and c == last:
            yield ('arrive', 1)
        n_base = 0
        pending = None  # the work tile whose last P V (ring position n_base - 1) and epilogue are still to come

        def wait_full(x, pos):
            s = pos % stages
            yield parity_wait('full_' + x, s, 0 if 'noparity' in MUT and x == 'k' else (pos // stages) & 1)
            assert data[(x, s)] == pos, f"consumer {c}: {x} stage {s} holds {data[(x, s)]}, wants {pos}"

        def release(x, pos):
            s = pos % stages
            readers[(x, s)].discard(c)
            yield ('mbar', 'empty_' + x, s)

        def epilogue(tj):  # stages through tile tj's Q buffer, then (kernel 5) hands it back
            b = tj % qbufs
            if persistent and 'earlyq' in MUT:
                yield ('mbar', 'empty_q', b)
            readers[('q', b)].add(c)
            yield ('work',)
            readers[('q', b)].discard(c)
            if persistent and 'earlyq' not in MUT:
                yield ('mbar', 'empty_q', b)

        def flush(pos, tj):  # the pending P V on its own, then the epilogue
            yield from wait_full('v', pos)
            readers[('v', pos % stages)].add(c)
            yield ('work',)
            yield from release('v', pos)
            yield from epilogue(tj)

        for j, nt in enumerate(tiles):
            b = j % qbufs
            if ring_per_tile and c == last:
                yield ('arrive', 1)
            yield parity_wait('full_q', b, (j // qbufs) & 1)
            assert data[('q', b)] == j, f"consumer {c} tile {j}: Q buffer {b} holds {data[('q', b)]}"
            if persistent:  # the count, read (by lane 0) after the wait, some time later
                yield ('work',)
                assert data[('cnt', b)] == j, f"consumer {c} tile {j}: count slot {b} holds {data[('cnt', b)]}'s"
                readers[('cnt', b)].discard(c)

            def issue_s(pos):
                readers[('q', b)].add(c)
                readers[('k', pos % stages)].add(c)

            if nt == 0:
                if pending is not None:
                    yield from flush(n_base - 1, pending)
                    pending = None
                yield from epilogue(j)
            else:
                yield from wait_full('k', n_base)
                yield ('sync', mine)
                issue_s(n_base)
                if pending is not None:
                    yield from wait_full('v', n_base - 1)
                    readers[('v', (n_base - 1) % stages)].add(c)
                yield ('arrive', nxt)
                readers[('q', b)].discard(c)  # wait<0>: S_0 (and the pending P V) complete
                yield from release('k', n_base)
                if pending is not None:
                    yield from release('v', n_base - 1)
                yield ('work',)  # softmax
                if pending is not None:
                    yield from epilogue(pending)
                    pending = None
                for n in range(1, nt):
                    pos = n_base + n
                    yield from wait_full('k', pos)
                    yield ('sync', mine)
                    issue_s(pos)
                    yield from wait_full('v', pos - 1)
                    readers[('v', (pos - 1) % stages)].add(c)
                    yield ('arrive', nxt)
                    yield ('work',)
                    readers[('q', b)].discard(c)  # wait<1>: S_n complete
                    yield from release('k', pos)
                    yield ('work',)  # softmax
                    yield from release('v', pos - 1)  # wait<0>: P V complete
                pending = j
                n_base += nt
            if ring_per_tile and c == 0:
                yield ('sync', 1)
        if pending is not None:
            yield from flush(n_base - 1, pending)
        if not ring_per_tile and c == 0:
            yield ('sync', 1)

    roles = {'prod': producer()}
    for c in range(nc):
        roles[f'c{c}'] = consumer(c)
    pending = {name: None for name in roles}
    done = set()

    def ready(name):
        op = pending[name]
        if op is None:
            return True
        if op[0] == 'sync':
            return False
        if op[0] == 'wait':
            return mb[op[1]][op[2]].phase != op[3]
        return True

    while len(done) < len(roles) or tma:
        runnable = [r for r in roles if r not in done and ready(r)]
        if tma:
            runnable.append('tma')
        if not runnable:
            raise AssertionError(f"deadlock: pending {pending}, named barrier counts "
                                 f"{ {k: b.arrived for k, b in bars.items() if b.arrived} }")
        name = rng.choice(runnable)
        if name == 'tma':
            buf, value, bar, idx = tma.pop(rng.randrange(len(tma)))
            data[buf] = value
            mb[bar][idx].arrive()
            continue
        pending[name] = None
        try:
            op = next(roles[name])
        except StopIteration:
            done.add(name)
            continue
        kind = op[0]
        if kind == 'arrive':
            for waiter in bars[op[1]].arrive(128):
                pending[waiter] = None
        elif kind == 'sync':
            bar = bars[op[1]]
            bar.waiting.append(name)
            released = bar.arrive(128)
            if name not in released:
                pending[name] = op
            for waiter in released:
                pending[waiter] = None
        elif kind == 'wait':
            pending[name] = op
            if ready(name):
                pending[name] = None
        elif kind == 'mbar':
            mb[op[1]][op[2]].arrive()
    left = {k: b.arrived for k, b in bars.items() if b.arrived}
    assert not left, f"named barriers left with arrivals at exit: {left}"


def run_all(seed):
    rng = random.Random(seed)
    trials = 0
    for nc, stages in ((3, 4), (2, 2)):  # D=64, D=128
        for kernel in (3, 5):
            for _ in range(1000):
                if kernel == 3:
                    tiles = [rng.choice([0, 1, 2, 3, 5, 9])]
                else:
                    tiles = [rng.choice([0, 0, 1, 2, 3, 4, 7]) for _ in range(rng.randint(0, 5))]
                simulate(kernel, nc, stages, tiles, rng)
                trials += 1
    return trials


def main():
    protocol_main(run_all, MUTATIONS, MUT)


if __name__ == "__main__":
    main()
