//! Helpers shared by integration tests, one submodule per family of tests. Each test
//! crate uses only some of them.

#![allow(dead_code)]

pub mod blocks;
pub mod interrupting;
pub mod paging;
pub mod smp;
pub mod vm;
