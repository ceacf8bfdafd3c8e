//! The memory budget of unfinished request heads, across all connections
//! (`[gateway] max_pending_head_bytes`).
//!
//! A head that arrives in one read never counts: it goes to the proxy at
//! once. One that needs more reads is registered here with its buffers'
//! size and its connection's state; when the sum passes seven eighths of
//! the budget (the rest is for what no head counts as its own), the oldest
//! unfinished heads are cut (answered `408` and closed) until it fits
//! again. Clients that send a head slowly on purpose are the oldest; a
//! prompt client's head is young and complete before anyone looks at it.
//!
//! A cut head's buffers are freed only when its connection's task next
//! runs; until then they count as condemned, and a head that wants another
//! buffer waits while live and condemned bytes together pass the budget
//! ([`PendingHeads::over_budget`]), so that memory, not only the count,
//! stays within it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The heads being read now, oldest first.
pub struct PendingHeads {
    /// Bytes held by heads not (yet) cut.
    held: AtomicUsize,
    /// Bytes of heads cut and not yet freed.
    condemned: AtomicUsize,
    budget: AtomicUsize,
    next: AtomicU64,
    heads: Mutex<BTreeMap<u64, Arc<Slot>>>,
}

/// One head's share: its bytes, and whether it has been cut.
#[derive(Default)]
struct Slot {
    bytes: AtomicUsize,
    cut: AtomicBool,
    woken: Notify,
}

/// A registered head; unregisters (and gives its bytes back) when dropped.
pub struct Ticket {
    heads: &'static PendingHeads,
    seq: u64,
    slot: Arc<Slot>,
}

impl PendingHeads {
    pub const fn new(budget: usize) -> Self {
        PendingHeads {
            held: AtomicUsize::new(0),
            condemned: AtomicUsize::new(0),
            budget: AtomicUsize::new(budget),
            next: AtomicU64::new(0),
            heads: Mutex::new(BTreeMap::new()),
        }
    }

    /// The budget follows the config, so a reload applies it.
    pub fn set_budget(&self, bytes: usize) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    /// Bytes held by unfinished heads now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Bytes of heads cut whose buffers are not yet freed.
    pub fn condemned(&self) -> usize {
        self.condemned.load(Ordering::Relaxed)
    }

    /// Whether live and condemned heads together hold more than heads may
    /// ([`Self::limit`]): a head should take no more memory until cut ones
    /// are freed.
    pub fn over_budget(&self) -> bool {
        self.held() + self.condemned() > self.limit()
    }

    /// What the heads may hold: seven eighths of the budget, the rest kept
    /// for the memory a flood of heads takes that no head can count as its
    /// own (the state of connections come and gone, the allocator's pages
    /// they leave partly used), so that the process grows by no more than
    /// the budget.
    fn limit(&self) -> usize {
        let budget = self.budget.load(Ordering::Relaxed);
        budget - budget / 8
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Slot>>> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start counting a head.
    pub fn register(&'static self) -> Ticket {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        self.lock().insert(seq, slot.clone());
        Ticket {
            heads: self,
            seq,
            slot,
        }
    }

    /// Cut the oldest heads until what is held fits the budget; how many
    /// were cut.
    fn enforce(&self) -> usize {
        let budget = self.limit();
        let mut cut = 0;
        if self.held.load(Ordering::Relaxed) <= budget {
            return cut;
        }
        let heads = self.lock();
        for slot in heads.values() {
            if self.held.load(Ordering::Relaxed) <= budget {
                break;
            }
            if slot.cut.swap(true, Ordering::AcqRel) {
                continue;
            }
            // Freed when its connection next runs; counted until then.
            let bytes = slot.bytes.load(Ordering::Acquire);
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            self.condemned.fetch_add(bytes, Ordering::Relaxed);
            slot.woken.notify_one();
            cut += 1;
        }
        cut
    }
}

impl Ticket {
    /// The head's buffer is now `bytes` long: count the change, and cut
    /// the oldest heads (this one among them) if the budget is passed.
    /// How many heads were cut.
    pub fn resize(&self, bytes: usize) -> usize {
        if self.slot.cut.load(Ordering::Acquire) {
            return 0;
        }
        let before = self.slot.bytes.swap(bytes, Ordering::AcqRel);
        if bytes >= before {
            self.heads.held.fetch_add(bytes - before, Ordering::Relaxed);
        } else {
            self.heads.held.fetch_sub(before - bytes, Ordering::Relaxed);
        }
        self.heads.enforce()
    }

    /// Whether the budget cut this head.
    pub fn is_cut(&self) -> bool {
        self.slot.cut.load(Ordering::Acquire)
    }

    /// Done when the budget cuts this head.
    pub async fn cut(&self) {
        loop {
            let woken = self.slot.woken.notified();
            if self.is_cut() {
                return;
            }
            woken.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Out of the map, no one cuts it any more: `cut` is settled.
        self.heads.lock().remove(&self.seq);
        let bytes = self.slot.bytes.swap(0, Ordering::AcqRel);
        if self.slot.cut.load(Ordering::Acquire) {
            self.heads.condemned.fetch_sub(bytes, Ordering::Relaxed);
        } else {
            self.heads.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(budget: usize) -> &'static PendingHeads {
        Box::leak(Box::new(PendingHeads::new(budget)))
    }

    #[test]
    fn the_oldest_heads_are_cut_when_the_budget_is_passed() {
        let h = heads(12_000);
        let old = h.register();
        let middle = h.register();
        let young = h.register();
        assert_eq!(old.resize(4_000), 0);
        assert_eq!(middle.resize(4_000), 0);
        assert_eq!(h.held(), 8_000);
        // 12 000 > 10 500 (seven eighths of the budget): the oldest goes,
        // and that is enough.
        assert_eq!(young.resize(4_000), 1);
        assert!(old.is_cut() && !middle.is_cut() && !young.is_cut());
        assert_eq!(h.held(), 8_000);
        // Its bytes stay counted until it is dropped (its buffers freed).
        assert_eq!(h.condemned(), 4_000);
        assert!(h.over_budget());
        // A cut head's growth is not counted again.
        assert_eq!(old.resize(9_000), 0);
        assert_eq!(h.held(), 8_000);
        // One head alone over the budget cuts the older one, then itself.
        assert_eq!(young.resize(11_000), 2);
        assert!(middle.is_cut() && young.is_cut());
        assert_eq!(h.held(), 0);
        assert_eq!(h.condemned(), 4_000 + 4_000 + 11_000);
        drop(old);
        assert_eq!(h.condemned(), 15_000);
        drop((middle, young));
        assert_eq!((h.held(), h.condemned()), (0, 0));
        assert!(!h.over_budget());
    }

    #[test]
    fn a_finished_head_gives_its_bytes_back() {
        let h = heads(1_000);
        let t = h.register();
        t.resize(400);
        let u = h.register();
        u.resize(300);
        assert_eq!(h.held(), 700);
        drop(t);
        assert_eq!(h.held(), 300);
        assert_eq!(u.resize(750), 0, "room again");
        drop(u);
        assert_eq!(h.held(), 0);
    }

    #[test]
    fn heads_may_hold_seven_eighths_of_the_budget() {
        let h = heads(8_000);
        let t = h.register();
        assert_eq!(t.resize(7_000), 0);
        assert!(!h.over_budget());
        assert_eq!(t.resize(7_001), 1);
        assert!(t.is_cut() && h.over_budget());
    }

    #[tokio::test]
    async fn a_cut_head_is_woken() {
        let h = heads(120);
        let old = h.register();
        old.resize(80);
        let waiting = tokio::spawn(async move {
            old.cut().await;
            old.is_cut()
        });
        tokio::task::yield_now().await;
        let young = h.register();
        assert_eq!(young.resize(50), 1);
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
                .await
                .expect("woken")
                .unwrap()
        );
    }
}
