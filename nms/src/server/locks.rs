//! One async lock per volume: a vehicle's load and a move's `Begin` of the same volume
//! exclude each other (see `Node::load`, `Node::admit_incoming`), while those of other
//! volumes go on (a load waiting on the PSS during an election no longer holds up every
//! other volume's load and every incoming move).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wayside_proto::types::VolumeName;

/// Past this many entries, `lock` drops those nobody holds or awaits (an awaiting caller
/// that gave up leaves its volume's entry behind until then).
const PRUNE_AT_ENTRIES: usize = 1024;

#[derive(Default)]
pub(crate) struct VolumeLocks {
    /// An entry lives while its lock is held or awaited.
    map: Mutex<HashMap<VolumeName, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a volume's lock; dropping it releases the lock (and the entry, if unused).
pub(crate) struct VolumeLockGuard<'a> {
    locks: &'a VolumeLocks,
    volume: VolumeName,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl VolumeLocks {
    /// Waits for, and takes, `v`'s lock.
    pub(crate) async fn lock(&self, v: &VolumeName) -> VolumeLockGuard<'_> {
        let m = {
            let mut map = self.map.lock().expect("poisoned");
            if map.len() >= PRUNE_AT_ENTRIES {
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            map.entry(v.clone()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        VolumeLockGuard { locks: self, volume: v.clone(), guard: Some(guard) }
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.map.lock().expect("poisoned").len()
    }
}

impl Drop for VolumeLockGuard<'_> {
    fn drop(&mut self) {
        // Under the map's lock: nobody can take a new reference to the entry between the
        // count and the removal.
        let mut map = self.locks.map.lock().expect("poisoned");
        drop(self.guard.take());
        if map.get(&self.volume).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.volume);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;

    #[tokio::test]
    async fn a_volume_waits_for_its_own_lock_only_and_entries_go_with_their_use() {
        let locks = VolumeLocks::default();
        let (v, w) = (VolumeName::new("v").unwrap(), VolumeName::new("w").unwrap());
        let held = locks.lock(&v).await;
        assert!(locks.lock(&w).now_or_never().is_some(), "another volume does not wait");
        let mut waiting = Box::pin(locks.lock(&v));
        assert!(waiting.as_mut().now_or_never().is_none(), "the same volume waits");
        drop(held);
        let again = waiting.await;
        assert_eq!(locks.entries(), 1, "w's entry went with its guard");
        drop(again);
        assert_eq!(locks.entries(), 0);
        // A waiter that gives up after the holder let go leaves its entry behind: the
        // volume's next use removes it, and so does a prune once the map is large.
        let leave_one = |name: String| {
            let locks = &locks;
            async move {
                let x = VolumeName::new(name).unwrap();
                let held = locks.lock(&x).await;
                let mut waiter = Box::pin(locks.lock(&x));
                assert!(waiter.as_mut().now_or_never().is_none());
                drop(held);
                drop(waiter);
            }
        };
        leave_one("v".into()).await;
        assert_eq!(locks.entries(), 1, "left behind");
        drop(locks.lock(&v).await);
        assert_eq!(locks.entries(), 0, "removed by the next use");
        for i in 0..PRUNE_AT_ENTRIES - 1 {
            leave_one(format!("x{i}")).await;
        }
        assert_eq!(locks.entries(), PRUNE_AT_ENTRIES - 1, "every one left behind");
        for i in 0..3 * PRUNE_AT_ENTRIES {
            leave_one(format!("y{i}")).await;
            assert!(locks.entries() <= PRUNE_AT_ENTRIES, "bounded: {}", locks.entries());
        }
    }
}
