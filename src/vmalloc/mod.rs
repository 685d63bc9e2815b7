//! The vmalloc manager: virtually contiguous kernel memory from scattered frames.

// Used by the manager; tests exercise the parts it does not use yet.
#[allow(dead_code)]
mod node;
#[allow(dead_code)]
mod space;

#[allow(unused_imports)]
pub(crate) use node::NodePool;
#[allow(unused_imports)]
pub(crate) use space::{Area, AreaMap, VMALLOC_END, VMALLOC_START, VSpace};
