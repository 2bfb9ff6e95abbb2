//! Token verification: what every request pays to know who it is. `token::parse` splits the
//! presented `sk_shield_t_<id>_<secret>`; `TokenVerifier::verify` is the keyed HMAC-SHA256 over
//! it with a constant-time comparison (the verifier is keyed once per configuration and cloned
//! per request).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: failing loudly is the point

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use shieldkey::token::{self, format_token, SECRET_BYTES};
use shieldkey::token_digest::TokenVerifier;

fn token_verification(c: &mut Criterion) {
    let verifier = TokenVerifier::new(&[7u8; 32]).unwrap();
    let (full, secret) = format_token("team-payments-7", &[42u8; SECRET_BYTES]);
    let digest = verifier.digest("team-payments-7", secret.expose());
    let header = [b"Bearer ".as_slice(), full.expose()].concat();

    let mut group = c.benchmark_group("token");
    group.bench_function("parse", |b| {
        b.iter(|| token::parse(black_box(full.expose())).unwrap().id.len())
    });
    group.bench_function("from_headers", |b| {
        b.iter(|| {
            token::from_headers(Some(black_box(header.as_slice())), None)
                .unwrap()
                .id
                .len()
        })
    });
    group.bench_function("verify", |b| {
        b.iter(|| {
            verifier.verify(
                black_box("team-payments-7"),
                black_box(secret.expose()),
                black_box(&digest),
            )
        })
    });
    group.bench_function("parse+verify", |b| {
        b.iter(|| {
            let presented = token::from_headers(Some(black_box(header.as_slice())), None).unwrap();
            assert!(verifier.verify(presented.id, presented.secret_text(), &digest));
        })
    });
    group.finish();
}

criterion_group!(benches, token_verification);
criterion_main!(benches);
