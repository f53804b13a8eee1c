//! Launch outputs taken from buffers that earlier launches of the same scope left
//! unreferenced, instead of from CubeCL's memory pool.
//!
//! Why: at batch 1 a decode step is ~145 launches, and the host has to enqueue them
//! faster than the GPU runs them. CubeCL 0.10 reserves every new buffer on its device
//! thread, in a page search of its pool (`MemoryPage::try_reserve` and `coalesce`): 40% of
//! that thread's samples in a profile of the 6.7B sparse step (run 29), the thread that
//! bounds the enqueueing. The layers of a step ask for the same shapes one after the
//! other, and each layer's outputs are dropped before the next layer runs, so a buffer
//! of the right size is almost always free on the host side already. Handing it out
//! again costs a hash lookup on the model's thread and nothing on the device thread.
//!
//! Safety of the reuse: a buffer is handed out again only when no tensor refers to it
//! any more — the same test (`Handle::can_mut`: only the pool's reference and ours
//! left) by which Burn writes into a tensor in place. Work already enqueued that reads
//! the buffer runs before the new writer, since a thread's launches run in order on its
//! stream; that is also why the buffers are kept per thread.
//!
//! Scope: [`OutputReuse::begin`] turns the reuse on for the current thread until the
//! guard is dropped, which returns every kept buffer to CubeCL's pool. The model opens
//! one around each forward pass, so nothing is held between calls.

use std::any::TypeId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;

use cubecl::server::{Handle, MemoryLayout};
use cubecl::zspace::Strides;

/// At most this many buffers of one layout are kept; past it a launch allocates as usual.
const MAX_PER_LAYOUT: usize = 64;
/// At most this many layouts are kept; past it the kept buffers are returned and the
/// collection starts again (a forward pass over ever new shapes should not grow it).
const MAX_LAYOUTS: usize = 512;

/// Which buffers are interchangeable: the runtime, the device and every tensor's shape
/// and element size, in order.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct LayoutKey {
    runtime: TypeId,
    device: cubecl::device::DeviceId,
    tensors: Vec<(Vec<usize>, usize)>,
}

impl LayoutKey {
    pub(crate) fn new(runtime: TypeId, device: cubecl::device::DeviceId, tensors: Vec<(Vec<usize>, usize)>) -> Self {
        Self { runtime, device, tensors }
    }
}

/// One kept allocation: a single reference to its memory (so that `can_mut` says whether
/// anybody else still holds it) and where each tensor lies in it.
struct Kept {
    memory: Handle,
    parts: Vec<(Option<u64>, Option<u64>, Strides)>,
}

impl Kept {
    fn layouts(&self) -> Vec<MemoryLayout> {
        self.parts
            .iter()
            .map(|(start, end, strides)| {
                let mut memory = self.memory.clone();
                memory.offset_start = *start;
                memory.offset_end = *end;
                MemoryLayout::new(memory, strides.clone())
            })
            .collect()
    }
}

#[derive(Default)]
struct KeptBuffers {
    depth: usize,
    by_layout: HashMap<LayoutKey, Vec<Kept>>,
    layouts: usize,
}

thread_local! {
    static KEPT: RefCell<KeptBuffers> = RefCell::new(KeptBuffers::default());
}

/// While alive, the CubeCL launchers on this thread take their outputs from buffers that
/// earlier launches of the scope no longer reference (see the module comment). Scopes
/// nest; the outermost one's drop returns the kept buffers to CubeCL's pool. Not `Send`:
/// the buffers belong to the thread's stream.
pub struct OutputReuse {
    _thread_bound: PhantomData<*const ()>,
}

impl OutputReuse {
    /// Turns the reuse on for the current thread until the guard is dropped.
    pub fn begin() -> Self {
        KEPT.with(|k| k.borrow_mut().depth += 1);
        Self { _thread_bound: PhantomData }
    }

    /// Buffers kept on this thread now (for tests).
    pub fn kept_buffers() -> usize {
        KEPT.with(|k| k.borrow().by_layout.values().map(Vec::len).sum())
    }
}

impl Drop for OutputReuse {
    fn drop(&mut self) {
        let released = KEPT.with(|k| {
            let mut k = k.borrow_mut();
            k.depth -= 1;
            if k.depth == 0 {
                k.layouts = 0;
                std::mem::take(&mut k.by_layout)
            } else {
                HashMap::new()
            }
        });
        drop(released);
    }
}

/// The layouts for `key`, from a kept buffer nobody references, or from `allocate` (then
/// kept, if a scope is open and the limits allow).
pub(crate) fn layouts(key: LayoutKey, allocate: impl FnOnce() -> Vec<MemoryLayout>) -> Vec<MemoryLayout> {
    let reused = KEPT.with(|k| {
        let k = k.borrow();
        if k.depth == 0 {
            return None;
        }
        k.by_layout.get(&key)?.iter().find(|kept| kept.memory.can_mut()).map(Kept::layouts)
    });
    if let Some(layouts) = reused {
        return layouts;
    }
    let layouts = allocate();
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        if k.depth == 0 || layouts.is_empty() {
            return;
        }
        let kept = Kept {
            memory: layouts[0].memory.clone(),
            parts: layouts.iter().map(|l| (l.memory.offset_start, l.memory.offset_end, l.strides.clone())).collect(),
        };
        if !k.by_layout.contains_key(&key) {
            if k.layouts >= MAX_LAYOUTS {
                k.by_layout.clear();
                k.layouts = 0;
            }
            k.layouts += 1;
        }
        let list = k.by_layout.entry(key).or_default();
        if list.len() < MAX_PER_LAYOUT {
            list.push(kept);
        }
    });
    layouts
}
