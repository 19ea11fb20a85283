//! Cost of recording one exchange into a `SlotMetrics`: alone, and with every core recording
//! into the same slot at once; plus the read side (drain + merge) the controller pays.

#![allow(clippy::disallowed_types)] // benches measure wall time with std::time::Instant

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use veer::metrics::{Epoch, ErrorKind, SlotMetrics};

/// Latencies cycled through, 150 µs to ~1.2 s, so records spread over many buckets.
fn latencies() -> Vec<Duration> {
    (0..64u64)
        .map(|i| Duration::from_micros(150 + i * i * i * 5 % 1_200_000))
        .collect()
}

fn record_one(m: &SlotMetrics, latency: Duration, i: usize) {
    if i % 64 == 63 {
        m.record_failure(Epoch::CURRENT, ErrorKind::Timeout, latency);
    } else {
        m.record_response(Epoch::CURRENT, 200, false, latency);
    }
}

fn single_thread(c: &mut Criterion) {
    let m = SlotMetrics::new();
    let latencies = latencies();
    let mut i = 0;
    c.bench_function("record/single_thread", |b| {
        b.iter(|| {
            i = (i + 1) % latencies.len();
            record_one(black_box(&m), black_box(latencies[i]), i);
        })
    });
}

/// Per-call time on each thread while `threads` threads record into `m` at once.
fn contended(m: &SlotMetrics, threads: usize, iters: u64) -> Duration {
    let latencies = latencies();
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (m, start, latencies) = (m, &start, &latencies);
                scope.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    for n in 0..iters as usize {
                        let i = n % latencies.len();
                        record_one(black_box(m), black_box(latencies[i]), i);
                    }
                    began.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .max()
            .unwrap_or_default()
    })
}

fn all_cores(c: &mut Criterion) {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sharded = SlotMetrics::new();
    c.bench_function(&format!("record/contended_{threads}_threads"), |b| {
        b.iter_custom(|iters| contended(&sharded, threads, iters))
    });
    let one_lock = SlotMetrics::with_shards(1);
    c.bench_function(
        &format!("record/contended_{threads}_threads_one_shard"),
        |b| b.iter_custom(|iters| contended(&one_lock, threads, iters)),
    );
}

fn reads(c: &mut Criterion) {
    let m = SlotMetrics::new();
    let latencies = latencies();
    for _ in 0..6 {
        for (i, latency) in latencies.iter().cycle().take(10_000).enumerate() {
            record_one(&m, *latency, i);
        }
        m.rotate();
    }
    c.bench_function("read/step", |b| b.iter(|| black_box(m.step())));
    c.bench_function("read/last_60s", |b| b.iter(|| black_box(m.last_60s())));
    c.bench_function("read/record_1000_then_step", |b| {
        b.iter(|| {
            for (i, latency) in latencies.iter().cycle().take(1000).enumerate() {
                record_one(&m, *latency, i);
            }
            black_box(m.step())
        })
    });
}

criterion_group!(benches, single_thread, all_cores, reads);
criterion_main!(benches);
