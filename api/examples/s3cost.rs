//! Per-request costs of an S3 store, measured with novabackup's own client
//! (docs/SCALING.md cites these): PUTs of pack-sized objects, ranged GETs
//! of one chunk and of a pack's tail, HEADs and LISTs of 1,000 keys.
//!
//!   cargo run --release -p novabackup-api --example s3cost -- ENV_FILE [ROUNDS]
//!
//! ENV_FILE is a credentials file as `--store-credentials` takes
//! (tests/garage/cluster.sh writes one). Objects go under `s3cost/`.

use std::time::Instant;

use novabackup_api::objstore::s3::S3;
use novabackup_api::objstore::S3Location;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let env = args.next().ok_or("usage: s3cost ENV_FILE [ROUNDS]")?;
    let rounds: usize = args.next().map_or(Ok(7), |r| r.parse())?;
    let loc = S3Location::parse("s3://nova/s3cost", Some(env.as_ref()))?;
    let s3 = S3::new(
        &loc.endpoints,
        &loc.region,
        &loc.bucket,
        &loc.prefix,
        rusty_s3::Credentials::new(loc.key_id.clone(), loc.secret.clone()),
    )?;
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    println!("| request | size | median ms | MB/s |");
    println!("|---|---|---|---|");
    for mib in [1usize, 4, 16, 64] {
        let body = noise(mib << 20);
        let mut t = Vec::new();
        for r in 0..rounds {
            let t0 = Instant::now();
            s3.put(&format!("put/{mib}-{r}"), &body)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        let m = median(t);
        println!(
            "| PUT | {mib} MiB | {:.1} | {:.0} |",
            m * 1e3,
            (mib << 20) as f64 / m / 1e6
        );
    }
    for (what, start, len) in [
        ("GET range (a chunk)", 1 << 20, 40_000u64),
        ("GET tail (a toc)", -65536i64, 65536),
    ] {
        let mut t = Vec::new();
        for r in 0..rounds * 4 {
            let t0 = Instant::now();
            s3.get_range(&format!("put/16-{}", r % rounds), start, len)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        println!(
            "| {what} | {} KiB | {:.2} | - |",
            len >> 10,
            median(t) * 1e3
        );
    }
    for mib in [1usize, 16] {
        let mut t = Vec::new();
        for r in 0..rounds {
            let t0 = Instant::now();
            s3.get(&format!("put/{mib}-{r}"))?;
            t.push(t0.elapsed().as_secs_f64());
        }
        let m = median(t);
        println!(
            "| GET | {mib} MiB | {:.1} | {:.0} |",
            m * 1e3,
            (mib << 20) as f64 / m / 1e6
        );
    }
    let mut t = Vec::new();
    for r in 0..rounds * 4 {
        let t0 = Instant::now();
        s3.head(&format!("put/1-{}", r % rounds))?;
        t.push(t0.elapsed().as_secs_f64());
    }
    println!("| HEAD | - | {:.2} | - |", median(t) * 1e3);
    let small = noise(64);
    for i in 0..1000 {
        s3.put(&format!("list/{i:04}"), &small)?;
    }
    let mut t = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let n = s3.list("list/")?.len();
        assert_eq!(n, 1000);
        t.push(t0.elapsed().as_secs_f64());
    }
    println!("| LIST | 1,000 keys | {:.1} | - |", median(t) * 1e3);
    let mut t = Vec::new();
    for i in 0..200 {
        let t0 = Instant::now();
        s3.put(&format!("small/{i}"), &small)?;
        t.push(t0.elapsed().as_secs_f64());
    }
    println!("| PUT (a manifest) | 64 B | {:.2} | - |", median(t) * 1e3);
    for l in s3.list("")? {
        s3.delete(&l.key)?;
    }
    Ok(())
}
