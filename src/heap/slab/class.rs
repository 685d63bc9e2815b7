//! The size classes and the shape of each class's slabs, computed at compile time.

use super::list::SlabHeader;
use crate::PAGE_SIZE;
use core::alloc::Layout;

/// The largest block the slabs serve; larger ones go to the list heap or vmalloc.
pub const MAX_OBJECT: usize = PAGE_SIZE as usize;

/// The class sizes: four per power of two, so a block wastes at most 20% of its
/// object (6% on average for sizes spread evenly).
pub const CLASS_SIZES: [usize; CLASSES] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
    1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096,
];

/// How many size classes there are.
pub const CLASSES: usize = 28;

/// The shape of one class's slabs.
#[derive(Clone, Copy)]
pub(in crate::heap) struct Geometry {
    pub(in crate::heap) size: usize,
    /// Alignment every object of the class has.
    pub(in crate::heap) align: usize,
    /// Bytes of a slab (its alignment too).
    pub(in crate::heap) slab_bytes: usize,
    /// Offset of the first object: the header, rounded up to `align`.
    pub(in crate::heap) first: usize,
    /// Objects per slab.
    pub(in crate::heap) capacity: u32,
    /// Objects the class's magazine holds: up to [`MAGAZINE`], about 8 KiB of them.
    pub(in crate::heap) magazine: usize,
}

const fn geometry(size: usize) -> Geometry {
    let align = 1 << size.trailing_zeros();
    let align = if align > MAX_OBJECT {
        MAX_OBJECT
    } else {
        align
    };
    let slab_bytes = if size <= 128 {
        PAGE_SIZE as usize
    } else if size <= 1024 {
        4 * PAGE_SIZE as usize
    } else {
        8 * PAGE_SIZE as usize
    };
    let first = core::mem::size_of::<SlabHeader>().next_multiple_of(align);
    Geometry {
        size,
        align,
        slab_bytes,
        first,
        capacity: ((slab_bytes - first) / size) as u32,
        magazine: {
            let fit = 8192 / size;
            if fit > MAGAZINE {
                MAGAZINE
            } else if fit < 4 {
                4
            } else {
                fit
            }
        },
    }
}

pub(in crate::heap) const GEOMETRY: [Geometry; CLASSES] = {
    let mut table = [geometry(16); CLASSES];
    let mut class = 0;
    while class < CLASSES {
        table[class] = geometry(CLASS_SIZES[class]);
        class += 1;
    }
    table
};

/// The smallest class whose size is at least `16 * i` bytes.
const SIZE_TO_CLASS: [u8; MAX_OBJECT / 16 + 1] = {
    let mut table = [0u8; MAX_OBJECT / 16 + 1];
    let (mut step, mut class) = (0, 0);
    while step < table.len() {
        while CLASS_SIZES[class] < step * 16 {
            class += 1;
        }
        table[step] = class as u8;
        step += 1;
    }
    table
};

/// Alignment every class's objects have at least: every class size is a multiple of
/// it, so a layout aligned no more than this is served by its size's class alone.
pub(in crate::heap) const MIN_ALIGN: usize = 16;

const _: () = {
    let mut class = 0;
    while class < CLASSES {
        assert!(
            GEOMETRY[class].align >= MIN_ALIGN,
            "every class is 16-aligned"
        );
        class += 1;
    }
};

/// The class of a block of `size` bytes aligned to at most [`MIN_ALIGN`]: one table
/// read.
///
/// # Panics
///
/// If `size` exceeds [`MAX_OBJECT`] (callers check it first).
#[inline(always)]
pub(in crate::heap) fn class_of_size(size: usize) -> usize {
    usize::from(SIZE_TO_CLASS[size.div_ceil(16)])
}

/// The class that serves `layout`, if any: the smallest at least as large and as
/// aligned.
pub fn class_for(layout: Layout) -> Option<usize> {
    let size = layout.size();
    if size > MAX_OBJECT || layout.align() > MAX_OBJECT {
        return None;
    }
    let mut class = usize::from(*SIZE_TO_CLASS.get(size.div_ceil(16))?);
    // The last class is page-aligned, so the walk stops there at the latest.
    while class + 1 < CLASSES && GEOMETRY[class].align < layout.align() {
        class += 1;
    }
    Some(class)
}

/// The most objects a class keeps freed in its magazine.
pub(super) const MAGAZINE: usize = 32;

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn every_class_fits_its_slab_and_is_aligned() {
        for geometry in GEOMETRY {
            assert!(geometry.capacity >= 7, "{} bytes", geometry.size);
            assert_eq!(geometry.first % geometry.align, 0);
            assert_eq!(geometry.size % geometry.align, 0);
            let used = geometry.first + geometry.capacity as usize * geometry.size;
            assert!(used <= geometry.slab_bytes);
            // Header and tail waste at most an eighth of the slab.
            assert!(geometry.slab_bytes - used <= geometry.slab_bytes / 8);
        }
    }

    #[test]
    fn a_layout_gets_the_smallest_class_that_is_large_and_aligned_enough() {
        let class = |size, align| class_for(Layout::from_size_align(size, align).unwrap());
        assert_eq!(class(1, 1), Some(0));
        assert_eq!(class(16, 8), Some(0));
        assert_eq!(class(17, 8), Some(1));
        assert_eq!(class(100, 8).map(|c| CLASS_SIZES[c]), Some(112));
        assert_eq!(class(40, 32).map(|c| CLASS_SIZES[c]), Some(64));
        assert_eq!(class(1, 2048).map(|c| CLASS_SIZES[c]), Some(2048));
        assert_eq!(class(4096, 4096).map(|c| CLASS_SIZES[c]), Some(4096));
        assert_eq!(class(4097, 8), None);
        assert_eq!(class(8, 8192), None);
        for size in 1..=MAX_OBJECT {
            let picked = CLASS_SIZES[class(size, 1).unwrap()];
            assert!(picked >= size && picked < size + size / 4 + 16);
        }
    }
}
