//! Listing sandboxes: filters, order and pages, as E2B's `GET /v2/sandboxes` has them.
//!
//! Filters apply before pagination, so a page never comes back short because of a
//! filter. The page token is the sort key of the last item shown (start time and id),
//! not a position: a page stays right when sandboxes before it end meanwhile, and a
//! token whose sandbox is gone still continues after it.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::template::registry::split_reference;
use crate::{Error, Result, SandboxInfo, SandboxState};

/// Largest page a client may ask for.
pub const MAX_PAGE: usize = 1000;

/// Sort order by start time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// Newest first (E2B's default).
    #[default]
    Desc,
    /// Oldest first.
    Asc,
}

impl std::str::FromStr for Order {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "desc" => Ok(Self::Desc),
            "asc" => Ok(Self::Asc),
            other => Err(Error::InvalidArgument(format!(
                "order must be asc or desc, not {other:?}"
            ))),
        }
    }
}

/// What a client asks a list for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Every pair must be in the sandbox's metadata.
    pub metadata: BTreeMap<String, String>,
    /// States to list (empty: all).
    pub states: Vec<SandboxState>,
    /// Only sandboxes started at or after this instant.
    pub started_after: Option<OffsetDateTime>,
    /// Only sandboxes of this template, named by its id or its name.
    pub template: Option<String>,
    /// Sort order.
    pub order: Order,
    /// Page size (1..=[`MAX_PAGE`]).
    pub limit: usize,
    /// Where the previous page ended ([`Page::next`]).
    pub after: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The sandboxes of this page.
    pub items: Vec<SandboxInfo>,
    /// The token of the next page, when there are more.
    pub next: Option<String>,
    /// How many running sandboxes there are in all (E2B's `X-Total-Running`).
    pub total_running: usize,
}

/// The sort key: start time in nanoseconds, then id.
fn key(s: &SandboxInfo) -> (i128, &str) {
    (s.started_at.unix_timestamp_nanos(), s.id.as_str())
}

fn token_of(s: &SandboxInfo) -> String {
    let (nanos, id) = key(s);
    format!("{nanos}.{id}")
}

fn parse_token(token: &str) -> Result<(i128, String)> {
    token
        .split_once('.')
        .and_then(|(n, id)| Some((n.parse().ok()?, id.to_string())))
        .filter(|(_, id)| !id.is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("invalid nextToken {token:?}")))
}

/// The page `q` asks for out of `all` (every sandbox the caller may see). `synonyms` are
/// the names `q.template` also goes by (a built template's id and name), so a sandbox
/// matches whichever the client names.
pub fn page(all: Vec<SandboxInfo>, q: &Query, synonyms: &[String]) -> Result<Page> {
    let total_running = all
        .iter()
        .filter(|s| s.state == SandboxState::Running)
        .count();
    let after = q.after.as_deref().map(parse_token).transpose()?;
    let mut items: Vec<SandboxInfo> = all
        .into_iter()
        .filter(|s| q.metadata.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .filter(|s| q.states.is_empty() || q.states.contains(&s.state))
        .filter(|s| q.started_after.is_none_or(|t| s.started_at >= t))
        .filter(|s| {
            let (name, _) = split_reference(&s.template);
            q.template.as_ref().is_none_or(|wanted| {
                std::iter::once(wanted)
                    .chain(synonyms)
                    .any(|n| n == &s.template || n == name)
            })
        })
        .collect();
    items.sort_by(|a, b| match q.order {
        Order::Asc => key(a).cmp(&key(b)),
        Order::Desc => key(b).cmp(&key(a)),
    });
    if let Some((nanos, id)) = &after {
        let past = |s: &SandboxInfo| {
            let k = key(s);
            match q.order {
                Order::Asc => k > (*nanos, id.as_str()),
                Order::Desc => k < (*nanos, id.as_str()),
            }
        };
        items.retain(past);
    }
    let limit = q.limit.clamp(1, MAX_PAGE);
    let more = items.len() > limit;
    items.truncate(limit);
    let next = items.last().filter(|_| more).map(token_of);
    Ok(Page {
        items,
        next,
        total_running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, SandboxId};

    fn sandbox(n: i64, template: &str, state: SandboxState) -> SandboxInfo {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000 + n).expect("time");
        SandboxInfo {
            id: format!("clm{n:03}").parse::<SandboxId>().expect("id"),
            template: template.into(),
            image: String::new(),
            state,
            metadata: BTreeMap::from([("n".to_string(), n.to_string())]),
            started_at: t,
            expires_at: t,
            limits: Limits::default(),
            internet: true,
            secure: false,
            volume_mounts: Vec::new(),
        }
    }

    fn ids(p: &Page) -> Vec<&str> {
        p.items.iter().map(|s| s.id.as_str()).collect()
    }

    fn five() -> Vec<SandboxInfo> {
        vec![
            sandbox(3, "base", SandboxState::Running),
            sandbox(1, "base", SandboxState::Running),
            sandbox(5, "python", SandboxState::Paused),
            sandbox(2, "python", SandboxState::Running),
            sandbox(4, "base", SandboxState::Running),
        ]
    }

    #[test]
    fn newest_first_unless_asc_and_pages_follow_the_token() {
        let q = Query {
            limit: 2,
            ..Query::default()
        };
        let p1 = page(five(), &q, &[]).expect("page");
        assert_eq!(ids(&p1), ["clm005", "clm004"]);
        assert_eq!(p1.total_running, 4);
        let p2 = page(
            five(),
            &Query {
                after: p1.next.clone(),
                ..q.clone()
            },
            &[],
        )
        .expect("page");
        assert_eq!(ids(&p2), ["clm003", "clm002"]);
        let p3 = page(
            five(),
            &Query {
                after: p2.next.clone(),
                ..q.clone()
            },
            &[],
        )
        .expect("page");
        assert_eq!(ids(&p3), ["clm001"]);
        assert_eq!(p3.next, None);
        let asc = page(
            five(),
            &Query {
                order: Order::Asc,
                limit: 10,
                ..Query::default()
            },
            &[],
        )
        .expect("page");
        assert_eq!(
            ids(&asc),
            ["clm001", "clm002", "clm003", "clm004", "clm005"]
        );
    }

    #[test]
    fn filters_apply_before_the_page() {
        let t3 = OffsetDateTime::from_unix_timestamp(1_700_000_003).expect("time");
        let q = Query {
            started_after: Some(t3),
            template: Some("base".into()),
            states: vec![SandboxState::Running],
            limit: 1,
            ..Query::default()
        };
        let p1 = page(five(), &q, &[]).expect("page");
        assert_eq!(ids(&p1), ["clm004"]);
        let p2 = page(
            five(),
            &Query {
                after: p1.next,
                ..q
            },
            &[],
        )
        .expect("page");
        assert_eq!(ids(&p2), ["clm003"], "started at the instant is included");
        assert_eq!(p2.next, None);
    }

    #[test]
    fn a_token_whose_sandbox_is_gone_still_continues_after_it() {
        let q = Query {
            limit: 2,
            ..Query::default()
        };
        let p1 = page(five(), &q, &[]).expect("page");
        let fewer: Vec<SandboxInfo> = five()
            .into_iter()
            .filter(|s| s.id.as_str() != "clm004")
            .collect();
        let p2 = page(
            fewer,
            &Query {
                after: p1.next,
                ..q
            },
            &[],
        )
        .expect("page");
        assert_eq!(ids(&p2), ["clm003", "clm002"]);
    }

    #[test]
    fn bad_tokens_and_orders_are_client_errors() {
        let q = Query {
            after: Some("garbage".into()),
            limit: 10,
            ..Query::default()
        };
        assert!(matches!(
            page(five(), &q, &[]),
            Err(Error::InvalidArgument(_))
        ));
        assert!("sideways".parse::<Order>().is_err());
        assert_eq!("ASC".parse::<Order>().ok(), Some(Order::Asc));
    }
}
