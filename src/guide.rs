//! The guide: how cachefence behaves, chapter by chapter.
//!
//! This module holds documentation only (no items). Each chapter is a
//! Markdown file in `docs/guide/` of the repository, included here so that
//! docs.rs shows it and `cargo test --doc` compiles its examples.
#![doc = include_str!("../docs/guide/overview.md")]

#[doc = include_str!("../docs/guide/configuration.md")]
pub mod configuration {}

#[doc = include_str!("../docs/guide/http_semantics.md")]
pub mod http_semantics {}

#[doc = include_str!("../docs/guide/invalidation.md")]
pub mod invalidation {}

#[doc = include_str!("../docs/guide/near_cache.md")]
pub mod near_cache {}

#[doc = include_str!("../docs/guide/queue.md")]
pub mod queue {}

#[doc = include_str!("../docs/guide/waiting.md")]
pub mod waiting {}

#[doc = include_str!("../docs/guide/cluster.md")]
pub mod cluster {}

#[doc = include_str!("../docs/guide/keys_and_acls.md")]
pub mod keys_and_acls {}

#[doc = include_str!("../docs/guide/security.md")]
pub mod security {}

#[doc = include_str!("../docs/guide/metrics.md")]
pub mod metrics {}

#[doc = include_str!("../docs/guide/failure.md")]
pub mod failure {}

#[doc = include_str!("../BENCHMARKS.md")]
pub mod benchmarks {}
