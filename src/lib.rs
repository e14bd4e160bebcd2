//! Root package: owns the cross-process tests in `tests/` and the benches in `benches/`.
