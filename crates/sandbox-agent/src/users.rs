//! Users and groups from /etc/passwd and /etc/group (a static binary has no NSS).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sys;

/// Largest passwd/group file we parse.
const MAX_DB_FILE: u64 = 4 << 20;

/// An acting user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Uid the work runs as.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory (relative paths resolve against it).
    pub home: PathBuf,
    /// Login shell.
    pub shell: String,
    /// True when the agent must switch to this identity (it runs as root and the user is not root).
    pub switch: bool,
}

/// Where user data comes from, and how tests override it.
#[derive(Debug, Clone)]
pub struct UserDb {
    etc: PathBuf,
    home_override: Option<PathBuf>,
    root: bool,
}

fn read_small(path: &Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_DB_FILE).read_to_string(&mut s);
    }
    s
}

/// True for names we accept as user names at all.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name
            .bytes()
            .any(|b| b == 0 || b == b':' || b == b'/' || b == b'\n' || b.is_ascii_whitespace())
}

impl UserDb {
    /// A database reading `<etc>/passwd` and `<etc>/group`.
    pub fn new(etc: PathBuf, home_override: Option<PathBuf>) -> Self {
        Self {
            etc,
            home_override,
            root: sys::geteuid() == 0,
        }
    }

    /// Looks up an acting user. When the agent is not root it can only act as itself,
    /// so the names `user` and `root` are accepted even without a passwd entry.
    pub fn lookup(&self, name: &str) -> Option<User> {
        if !valid_name(name) {
            return None;
        }
        let passwd = read_small(&self.etc.join("passwd"));
        let entry = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 7 && f[0] == name {
                Some((
                    f[2].parse::<u32>().ok()?,
                    f[3].parse::<u32>().ok()?,
                    f[5].to_string(),
                    f[6].to_string(),
                ))
            } else {
                None
            }
        });
        let (uid, gid, home, shell) = match entry {
            Some(e) => e,
            None if !self.root && (name == "user" || name == "root") => (
                sys::geteuid(),
                sys::getegid(),
                format!("/home/{name}"),
                "/bin/sh".to_string(),
            ),
            None => return None,
        };
        let home = match &self.home_override {
            Some(h) => h.clone(),
            None if home.is_empty() => PathBuf::from("/"),
            None => PathBuf::from(home),
        };
        if !self.root {
            return Some(User {
                name: name.to_string(),
                uid: sys::geteuid(),
                gid: sys::getegid(),
                groups: Vec::new(),
                home,
                shell,
                switch: false,
            });
        }
        let groups = self.groups_of(name, gid);
        Some(User {
            name: name.to_string(),
            uid,
            gid,
            groups,
            home,
            shell,
            switch: uid != 0,
        })
    }

    fn groups_of(&self, name: &str, primary: u32) -> Vec<u32> {
        let group = read_small(&self.etc.join("group"));
        let mut out = vec![primary];
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse::<u32>() {
                    if !out.contains(&g) {
                        out.push(g);
                    }
                }
            }
        }
        out.truncate(64);
        out
    }

    /// uid -> name and gid -> name tables (for EntryInfo owner/group).
    pub fn names(&self) -> Names {
        fn table(s: &str) -> HashMap<u32, String> {
            s.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
                })
                .collect()
        }
        Names {
            users: table(&read_small(&self.etc.join("passwd"))),
            groups: table(&read_small(&self.etc.join("group"))),
        }
    }
}

/// Name tables for one request.
#[derive(Debug, Default, Clone)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// Owner name, or the number.
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    /// Group name, or the number.
    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_group_and_overrides_home() {
        let dir = std::env::temp_dir().join(format!("agent-users-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        std::fs::write(
            dir.join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1500:1600::/home/alice:/bin/zsh\n",
        )
        .expect("write");
        std::fs::write(dir.join("group"), "alice:x:1600:\ndev:x:1700:bob,alice\n").expect("write");
        let db = UserDb::new(dir.clone(), None);
        let a = db.lookup("alice").expect("alice");
        assert_eq!(a.home, PathBuf::from("/home/alice"));
        if sys::geteuid() == 0 {
            assert_eq!((a.uid, a.gid), (1500, 1600));
            assert_eq!(a.groups, vec![1600, 1700]);
            assert!(a.switch);
        } else {
            assert!(!a.switch);
        }
        assert!(db.lookup("mallory").is_none());
        assert!(db.lookup("bad:name").is_none());
        let names = db.names();
        assert_eq!(names.user(1500), "alice");
        assert_eq!(names.group(1700), "dev");
        assert_eq!(names.group(4242), "4242");
        let db2 = UserDb::new(dir.clone(), Some(PathBuf::from("/tmp/x")));
        assert_eq!(
            db2.lookup("alice").map(|u| u.home),
            Some(PathBuf::from("/tmp/x"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
