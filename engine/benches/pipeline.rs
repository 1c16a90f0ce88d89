//! The chunk pipeline against its parts, in MB/s of image data:
//! SHA-256 alone (one chunk at a time, and in pairs as the pipeline
//! hashes), zstd alone at the default level, hash-then-compress on one core (the "ideal"
//! per core), and the whole backup pipeline (read, hash, compress, store
//! to a tmpfs store) on every core. `benches/pipeline.sh` turns the
//! medians into the ratio pipeline / (ideal per core x cores).
//!
//! Data: 64 MiB of the shared corpus's vm.img (from 1 GiB in) when
//! $NBBENCH/corpus/vm.img exists, else a synthetic mix of text, noise and
//! zeroes.

// criterion_group! generates undocumented public items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use novabackup_engine::backup::{self, BackupOptions, BackupRequest, Quiescent};
use novabackup_engine::cbt::persist::Trust;
use novabackup_engine::cbt::{DirtyBitmap, Granularity};
use novabackup_engine::digest::{is_all_zero, ChunkDigest};
use novabackup_engine::format::chunk;
use novabackup_engine::format::manifest::CbtRecord;
use novabackup_engine::plan::{plan, Mode, PlanInput};
use novabackup_engine::progress::Progress;
use novabackup_engine::read::ReadEngine;
use novabackup_engine::store::local::LocalStore;

const LEN: usize = 64 << 20;
const CS: usize = 64 * 1024;

fn sample() -> Vec<u8> {
    let nb = std::env::var("NBBENCH").unwrap_or_else(|_| "/tmp/nbbench".into());
    let corpus = PathBuf::from(nb).join("corpus/vm.img");
    let mut v = vec![0u8; LEN];
    if let Ok(f) = std::fs::File::open(&corpus) {
        if f.read_exact_at(&mut v, 1 << 30).is_ok() {
            eprintln!("pipeline bench: 64 MiB of {}", corpus.display());
            return v;
        }
    }
    eprintln!(
        "pipeline bench: synthetic data (no corpus at {})",
        corpus.display()
    );
    let mut x = 88172645463325252u64;
    for (i, c) in v.chunks_mut(CS).enumerate() {
        match i % 4 {
            0 => {}
            1 => {
                for (j, b) in c.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps "[(j + i) % 26];
                }
            }
            _ => {
                for b in c.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = (x >> 24) as u8;
                }
            }
        }
    }
    v
}

fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = sample();
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("sha256", |b| {
        b.iter(|| {
            for ch in data.chunks(CS) {
                black_box(ChunkDigest::of(ch));
            }
        })
    });
    // What the pipeline does: neighbours of a batch hashed as pairs.
    g.bench_function("sha256_pairs", |b| {
        b.iter(|| {
            for batch in data.chunks(16 * CS) {
                let bufs: Vec<&[u8]> = batch.chunks(CS).collect();
                black_box(ChunkDigest::of_each(&bufs));
            }
        })
    });
    g.bench_function("zstd", |b| {
        let mut z = chunk::compressor(backup::DEFAULT_ZSTD_LEVEL).unwrap();
        b.iter(|| {
            for ch in data.chunks(CS) {
                black_box(z.compress(ch).unwrap());
            }
        })
    });
    g.bench_function("ideal_one_core", |b| {
        let mut z = chunk::compressor(backup::DEFAULT_ZSTD_LEVEL).unwrap();
        b.iter(|| {
            // Hashed as the pipeline hashes them (pairs, by batch).
            for batch in data.chunks(16 * CS) {
                let bufs: Vec<&[u8]> = batch.chunks(CS).filter(|c| !is_all_zero(c)).collect();
                black_box(ChunkDigest::of_each(&bufs));
                for ch in bufs {
                    black_box(chunk::encode(ch, &mut z));
                }
            }
        })
    });
    // Encrypted or already compressed data: zstd alone against encoding,
    // which stores such chunks raw without asking zstd.
    let random = noise(LEN);
    g.bench_function("zstd_random", |b| {
        let mut z = chunk::compressor(backup::DEFAULT_ZSTD_LEVEL).unwrap();
        b.iter(|| {
            for ch in random.chunks(CS) {
                black_box(z.compress(ch).unwrap());
            }
        })
    });
    g.bench_function("encode_random", |b| {
        let mut z = chunk::compressor(backup::DEFAULT_ZSTD_LEVEL).unwrap();
        b.iter(|| {
            for ch in random.chunks(CS) {
                black_box(chunk::encode(ch, &mut z));
            }
        })
    });
    drop(random);
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let img_path = shm.path().join("img");
    std::fs::write(&img_path, &data).unwrap();
    let img = std::fs::File::open(&img_path).unwrap();
    let frozen = DirtyBitmap::new(LEN as u64, Granularity::new(CS as u64).unwrap());
    let p = plan(&PlanInput {
        size: LEN as u64,
        chunk_size: CS as u64,
        mode: Mode::Full,
        frozen: &frozen,
        trust: &Trust::Trusted,
        base: None,
        no_base_reason: "",
        data: None,
    });
    let disk = "bench".parse().unwrap();
    let mut t = 0;
    g.bench_function("backup_pipeline", |b| {
        b.iter_batched(
            || {
                let d = tempfile::tempdir_in(shm.path()).unwrap();
                let s = LocalStore::open(&d.path().join("store")).unwrap();
                (d, s)
            },
            |(d, store)| {
                t += 1;
                let req = BackupRequest {
                    disk: &disk,
                    image: &img,
                    size: LEN as u64,
                    plan: &p,
                    base: None,
                    pit: &Quiescent,
                    time_unix: t,
                    cbt: CbtRecord {
                        granularity: CS as u64,
                        dirty_blocks: 0,
                        trusted: true,
                    },
                    engine: ReadEngine::probe(),
                    audit: None,
                    budget: None,
                    pages: None,
                };
                black_box(
                    backup::run(
                        &store,
                        &req,
                        &BackupOptions::default(),
                        &Progress::default(),
                    )
                    .unwrap(),
                );
                drop(d);
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
