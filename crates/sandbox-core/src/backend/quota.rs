//! What an engine's disk quota counts, where its storage is on this machine.
//!
//! On btrfs the answer depends on the filesystem's quota mode, not on the storage
//! driver: full qgroups limit what a container's subvolume references (the image
//! included), simple quotas (`squota`, Linux 6.7+) only what it writes. A driver name
//! alone cannot tell them apart.

use std::path::Path;

/// Whether the quota of a btrfs storage rooted at `root` counts the image too: false
/// when `root` lies on a local btrfs filesystem in simple-quota mode, true otherwise
/// (full qgroups, or a storage this machine cannot see, e.g. inside a VM).
pub fn btrfs_quota_counts_image(root: &Path) -> bool {
    let Some(device) = btrfs_device_of(root) else {
        return true;
    };
    let Ok(filesystems) = std::fs::read_dir("/sys/fs/btrfs") else {
        return true;
    };
    for fs in filesystems.flatten() {
        if fs.path().join("devices").join(&device).exists() {
            let mode = std::fs::read_to_string(fs.path().join("qgroups/mode")).unwrap_or_default();
            return mode.trim() != "squota";
        }
    }
    true
}

/// The kernel name (`loop0`, `sda2`) of the device of the btrfs mount holding `root`.
fn btrfs_device_of(root: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        // `id parent major:minor root mountpoint options... - fstype source superopts`
        let (left, right) = line.split_once(" - ")?;
        let mountpoint = left.split(' ').nth(4)?;
        let mut right = right.split(' ');
        let (fstype, source) = (right.next()?, right.next()?);
        if fstype != "btrfs" || !root.starts_with(mountpoint) {
            continue;
        }
        if best.as_ref().is_none_or(|(len, _)| mountpoint.len() > *len) {
            let name = Path::new(source)
                .file_name()?
                .to_string_lossy()
                .into_owned();
            best = Some((mountpoint.len(), name));
        }
    }
    best.map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_this_machine_cannot_see_counts_the_image() {
        assert!(btrfs_quota_counts_image(Path::new(
            "/nonexistent/colima-e2b/storage"
        )));
    }
}
