//! Which routed slots DeepSpeed-MoE's capacity keeps (`deepspeed/moe/sharded_moe.py`,
//! `top1gating` and `top2gating` with `drop_tokens`), decided on the host from the expert ids.
//!
//! - Top-2 (and any k > 1): slots fill choice by choice: expert e's location of a token's j-th
//!   choice counts every earlier choice's slots at e, then the j-th choices of earlier tokens
//!   (`locations2 = cumsum(mask2) - 1 + sum(mask1)`); a slot whose location is past the
//!   capacity is dropped.
//! - Top-1: `_top_idx(mask1, capacity)` = `torch.topk(mask1, capacity, dim=0)`: each expert
//!   keeps `capacity` of its tokens, chosen by topk over a 0/1 column, so *which* tokens is
//!   the tie order of PyTorch's CPU topk (`aten/src/ATen/native/TopKImpl.h`: libstdc++'s
//!   `std::nth_element`, or `std::partial_sort` when `k * 64 <= n`, over (value, index) pairs
//!   compared by value). [`torch_cpu_topk`] replays those algorithms step for step, so the
//!   kept set is DeepSpeed's on the CPU exactly (its parity fixtures). DeepSpeed on a GPU keeps
//!   a different subset of the same size (CUDA's radix select); no order is better, this one
//!   is reproducible.

/// `keep[t * k + j]`: whether token t's j-th choice `ids[t * k + j]` (of `experts` experts)
/// fits its expert's `capacity`.
pub fn kept_slots(ids: &[u32], top_k: usize, experts: usize, capacity: usize) -> Vec<bool> {
    let tokens = ids.len() / top_k.max(1);
    let mut keep = vec![false; ids.len()];
    if top_k == 1 {
        for e in 0..experts as u32 {
            let column: Vec<i64> = ids.iter().map(|&id| i64::from(id == e)).collect();
            // topk's picks past the expert's own tokens are zeros of other experts' tokens
            for t in torch_cpu_topk(&column, capacity.min(tokens)) {
                keep[t] |= column[t] == 1;
            }
        }
        return keep;
    }
    let mut filled = vec![0usize; experts];
    for j in 0..top_k {
        for t in 0..tokens {
            let slot = t * top_k + j;
            let e = ids[slot] as usize;
            keep[slot] = filled[e] < capacity;
            filled[e] += 1;
        }
    }
    keep
}

/// The indices `torch.topk(values, k, largest=True)` returns on the CPU, as a set (in the order
/// the selection leaves them).
pub fn torch_cpu_topk(values: &[i64], k: usize) -> Vec<usize> {
    let mut queue: Vec<(i64, usize)> = values.iter().copied().zip(0..).collect();
    let n = queue.len();
    if k == 0 || n == 0 {
        return Vec::new();
    }
    if k * 64 <= n {
        // std::partial_sort = heap select, then a heap sort of the first k (order only)
        libstdcxx::heap_select(&mut queue, 0, k, n);
    } else {
        libstdcxx::nth_element(&mut queue, k - 1);
    }
    queue[..k].iter().map(|&(_, i)| i).collect()
}

/// libstdc++'s selection algorithms (`bits/stl_algo.h`, `bits/stl_heap.h`) with PyTorch's
/// `largest` comparator `x.first > y.first`, written over indices into one slice.
mod libstdcxx {
    type Elem = (i64, usize);

    fn comp(a: &Elem, b: &Elem) -> bool {
        a.0 > b.0
    }

    /// `std::nth_element(first, first + nth, last)`: `__introselect` with depth `2 lg n`.
    pub fn nth_element(v: &mut [Elem], nth: usize) {
        let n = v.len();
        if n == 0 || nth == n {
            return;
        }
        let (mut first, mut last) = (0, n);
        let mut depth = 2 * n.ilog2();
        while last - first > 3 {
            if depth == 0 {
                heap_select(v, first, nth + 1, last);
                v.swap(first, nth);
                return;
            }
            depth -= 1;
            let cut = unguarded_partition_pivot(v, first, last);
            if cut <= nth {
                first = cut;
            } else {
                last = cut;
            }
        }
        insertion_sort(v, first, last);
    }

    fn unguarded_partition_pivot(v: &mut [Elem], first: usize, last: usize) -> usize {
        let mid = first + (last - first) / 2;
        move_median_to_first(v, first, first + 1, mid, last - 1);
        unguarded_partition(v, first + 1, last, first)
    }

    fn move_median_to_first(v: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
        let pick = if comp(&v[a], &v[b]) {
            if comp(&v[b], &v[c]) {
                b
            } else if comp(&v[a], &v[c]) {
                c
            } else {
                a
            }
        } else if comp(&v[a], &v[c]) {
            a
        } else if comp(&v[b], &v[c]) {
            c
        } else {
            b
        };
        v.swap(result, pick);
    }

    fn unguarded_partition(v: &mut [Elem], mut first: usize, mut last: usize, pivot: usize) -> usize {
        loop {
            while comp(&v[first], &v[pivot]) {
                first += 1;
            }
            last -= 1;
            while comp(&v[pivot], &v[last]) {
                last -= 1;
            }
            if first >= last {
                return first;
            }
            v.swap(first, last);
            first += 1;
        }
    }

    fn insertion_sort(v: &mut [Elem], first: usize, last: usize) {
        if first == last {
            return;
        }
        for i in first + 1..last {
            let val = v[i];
            if comp(&val, &v[first]) {
                v.copy_within(first..i, first + 1);
                v[first] = val;
            } else {
                // `__unguarded_linear_insert`: v[first] stops the walk
                let mut hole = i;
                while comp(&val, &v[hole - 1]) {
                    v[hole] = v[hole - 1];
                    hole -= 1;
                }
                v[hole] = val;
            }
        }
    }

    /// `std::__heap_select(first, middle, last)`: [first, middle) ends up holding the
    /// `middle - first` best elements as a heap.
    pub fn heap_select(v: &mut [Elem], first: usize, middle: usize, last: usize) {
        make_heap(v, first, middle);
        for i in middle..last {
            if comp(&v[i], &v[first]) {
                // `__pop_heap(first, middle, i)`
                let value = v[i];
                v[i] = v[first];
                adjust_heap(v, first, 0, middle - first, value);
            }
        }
    }

    fn make_heap(v: &mut [Elem], first: usize, last: usize) {
        let len = last - first;
        if len < 2 {
            return;
        }
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[first + parent];
            adjust_heap(v, first, parent, len, value);
            if parent == 0 {
                return;
            }
            parent -= 1;
        }
    }

    fn adjust_heap(v: &mut [Elem], first: usize, mut hole: usize, len: usize, value: Elem) {
        let top = hole;
        let mut second = hole;
        while second < (len - 1) / 2 {
            second = 2 * (second + 1);
            if comp(&v[first + second], &v[first + second - 1]) {
                second -= 1;
            }
            v[first + hole] = v[first + second];
            hole = second;
        }
        if len.is_multiple_of(2) && second == (len - 2) / 2 {
            second = 2 * (second + 1);
            v[first + hole] = v[first + second - 1];
            hole = second - 1;
        }
        // `__push_heap(first, hole, top, value)`
        while hole > top {
            let parent = (hole - 1) / 2;
            if !comp(&v[first + parent], &value) {
                break;
            }
            v[first + hole] = v[first + parent];
            hole = parent;
        }
        v[first + hole] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Selection keeps k of the largest values whatever the tie order, on both algorithms.
    #[test]
    fn topk_keeps_k_of_the_largest() {
        for n in [1usize, 3, 4, 5, 17, 64, 130, 1000] {
            for k in [1usize, 2, n / 3, n / 2, n] {
                if k == 0 || k > n {
                    continue;
                }
                let values: Vec<i64> = (0..n).map(|i| ((i * 7919) % 13) as i64 % 3).collect();
                let mut sorted = values.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                let picked = torch_cpu_topk(&values, k);
                let mut got: Vec<i64> = picked.iter().map(|&i| values[i]).collect();
                got.sort_unstable_by(|a, b| b.cmp(a));
                assert_eq!(got, sorted[..k], "n={n} k={k}");
                let mut unique = picked.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), k, "n={n} k={k}: distinct indices");
            }
        }
    }

    /// Top-2 fills every first choice before any second choice.
    #[test]
    fn second_choices_come_after_first_choices() {
        // 3 tokens, all first choices at expert 0, second choices at expert 1 then 0
        let ids = [0, 1, 0, 1, 0, 0];
        // capacity 3: expert 0 takes the three first choices, token 2's second choice is dropped
        assert_eq!(kept_slots(&ids, 2, 2, 3), vec![true, true, true, true, true, false]);
    }
}
