//! Credit grants: an agent's balance is a set of grants, and every rule of which grant a
//! spend draws from, and where returned money goes, lives here, shared by `decide` (to
//! know the balance after each event) and `evolve` (to apply it).
//!
//! **Draws are a deterministic function of the state, applied in `evolve`** (they are not
//! recorded in the events). Why: the journal of a debit, hold, capture, void or refund
//! keeps the exact shape it had before grants (no duplicate event variants, no draw lists
//! in every entry), journals written before grants replay through the same rules, and a
//! hold's or debit's draws are kept in the state (`Hold::draws`, `Refundable::draws`),
//! where the return of money needs them. The price: the draw order below is part of the
//! journal's meaning; changing it is a format change (a new event variant), not an edit.
//! Expiry, which needs a clock, is never decided here: `decide` journals it as
//! [`crate::EventKind::GrantExpired`] before any due grant could be drawn from.
//!
//! The rules:
//! - draw order: `priority` ascending, then earliest `expires_at_ms` (never last), then
//!   oldest (grant id = the seq of the event that issued it);
//! - never-expiring grants of the same priority and category are one grant (a later one
//!   merges into the older): they are adjacent in the draw order, so merging them changes
//!   nothing observable except the count, and it keeps an agent topped up by plain credits
//!   at one grant;
//! - a spent-out grant is dropped from the state;
//! - a capture spends a hold's reservation in draw order and returns the rest; a refund
//!   returns money starting from the debit's last draw (it undoes the spend backwards);
//! - returned money goes back to the grant it came from; if that grant was spent out (and
//!   dropped) it comes back with its old id and terms; a never-expiring one merges into the
//!   live grant of its terms if there is one. If the grant's `expires_at_ms` has passed,
//!   the returned money **lapses**: `decide` journals a `GrantExpired` for it right after
//!   the return, in the same command.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::TimestampMs;

/// The priority of a plain credit, and of a grant that names none. Lower is drawn first.
pub const GRANT_PRIORITY_DEFAULT: u32 = 100;

/// Where a grant's money came from, for reports: bought, or given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantCategory {
    Paid,
    Promotional,
}

impl GrantCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantCategory::Paid => "paid",
            GrantCategory::Promotional => "promotional",
        }
    }
}

/// A grant's terms: what decides its place in the draw order and its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantTerms {
    pub expires_at_ms: Option<TimestampMs>,
    pub priority: u32,
    pub category: GrantCategory,
}

impl GrantTerms {
    /// A plain credit's terms: paid, default priority, never expires.
    pub const PLAIN: GrantTerms = GrantTerms {
        expires_at_ms: None,
        priority: GRANT_PRIORITY_DEFAULT,
        category: GrantCategory::Paid,
    };

    /// Expired at `now_ms`: at exactly `expires_at_ms` a grant is gone.
    pub fn is_due(&self, now_ms: TimestampMs) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

/// Money issued to an agent, drawn by spends in [`draw_order`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Issued (plus what merged into it and what came back after it was spent out).
    pub amount_micros: u64,
    pub remaining_micros: u64,
    pub terms: GrantTerms,
    /// A `grant.expiring` notification was journaled for it (see [`crate::threshold`]).
    pub expiry_warned: bool,
}

/// An agent's live grants by id, in id order. A sorted vector rather than a `BTreeMap`:
/// an agent holds a few grants (most often one, its plain credit), and a map's first
/// node reserves room for eleven, ~600 bytes in every cached agent record (75 MiB at the
/// then-default cache of 131,072 agents). Encoded exactly as the map it replaced, so stored
/// records read the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "BTreeMap<u64, Grant>")]
pub struct GrantMap(Vec<(u64, Grant)>);

impl GrantMap {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Grants it has room for without growing (what a cached record costs in memory).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    fn position(&self, id: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(k, _)| *k)
    }

    pub fn get(&self, id: &u64) -> Option<&Grant> {
        self.position(*id).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut Grant> {
        self.position(*id).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, id: &u64) -> bool {
        self.position(*id).is_ok()
    }

    /// Inserts or replaces grant `id`; returns the one replaced.
    pub fn insert(&mut self, id: u64, grant: Grant) -> Option<Grant> {
        match self.position(id) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, grant)),
            Err(i) => {
                reserve_one!(self.0);
                self.0.insert(i, (id, grant));
                None
            }
        }
    }

    pub fn remove(&mut self, id: &u64) -> Option<Grant> {
        self.position(*id).ok().map(|i| self.0.remove(i).1)
    }

    /// Grant `id`, inserted as `grant` first if there is none.
    pub fn get_or_insert(&mut self, id: u64, grant: Grant) -> &mut Grant {
        let i = match self.position(id) {
            Ok(i) => i,
            Err(i) => {
                reserve_one!(self.0);
                self.0.insert(i, (id, grant));
                i
            }
        };
        &mut self.0[i].1
    }

    /// In id order (the oldest first).
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Grant)> {
        self.0.iter().map(|(id, g)| (id, g))
    }

    pub fn keys(&self) -> impl Iterator<Item = &u64> {
        self.0.iter().map(|(id, _)| id)
    }

    pub fn values(&self) -> impl Iterator<Item = &Grant> {
        self.0.iter().map(|(_, g)| g)
    }
}

impl std::ops::Index<&u64> for GrantMap {
    type Output = Grant;

    fn index(&self, id: &u64) -> &Grant {
        self.get(id).expect("no grant with this id")
    }
}

impl<'a> IntoIterator for &'a GrantMap {
    type Item = (&'a u64, &'a Grant);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (u64, Grant)>,
        fn(&'a (u64, Grant)) -> (&'a u64, &'a Grant),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(id, g)| (id, g))
    }
}

impl From<BTreeMap<u64, Grant>> for GrantMap {
    fn from(map: BTreeMap<u64, Grant>) -> Self {
        // A map's iteration is in key order: sorted already.
        Self(map.into_iter().collect())
    }
}

impl FromIterator<(u64, Grant)> for GrantMap {
    fn from_iter<I: IntoIterator<Item = (u64, Grant)>>(iter: I) -> Self {
        let map: BTreeMap<u64, Grant> = iter.into_iter().collect();
        map.into()
    }
}

impl Serialize for GrantMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// Money a hold reserved, or a debit took, from one grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draw {
    pub grant_id: u64,
    pub micros: u64,
    /// The grant's terms, so that money returned after the grant was dropped finds them.
    pub terms: GrantTerms,
}

/// The sort key of the draw order: priority, then expiry (never last), then id.
fn order_key(id: u64, g: &Grant) -> (u32, bool, Option<TimestampMs>, u64) {
    (
        g.terms.priority,
        g.terms.expires_at_ms.is_none(),
        g.terms.expires_at_ms,
        id,
    )
}

/// Grant ids in the order spends draw from them.
pub fn draw_order(grants: &GrantMap) -> Vec<u64> {
    let mut ids: Vec<u64> = grants.keys().copied().collect();
    ids.sort_by_key(|id| order_key(*id, &grants[id]));
    ids
}

/// The draws a spend of `amount_micros` takes, or `None` when the grants hold less.
pub(crate) fn plan_draws(grants: &GrantMap, amount_micros: u64) -> Option<Vec<Draw>> {
    let mut left = amount_micros;
    // Most spends draw from one grant, and the draws stay in the record for refunds.
    let mut draws = Vec::with_capacity(1);
    for id in draw_order(grants) {
        if left == 0 {
            break;
        }
        let g = &grants[&id];
        let micros = g.remaining_micros.min(left);
        if micros > 0 {
            draws.push(Draw {
                grant_id: id,
                micros,
                terms: g.terms,
            });
            left -= micros;
        }
    }
    (left == 0).then_some(draws)
}

/// The micros of `draws` taken from (or returned to) promotional grants.
pub(crate) fn promotional(draws: &[Draw]) -> u64 {
    draws
        .iter()
        .filter(|d| d.terms.category == GrantCategory::Promotional)
        .map(|d| d.micros)
        .sum()
}

/// The promotional part of a spend of `amount_micros` from `grants` (what its draws would
/// take from promotional grants); 0 without looking further when none is promotional.
pub(crate) fn promotional_part(grants: &GrantMap, amount_micros: u64) -> u64 {
    if grants
        .values()
        .all(|g| g.terms.category != GrantCategory::Promotional)
    {
        return 0;
    }
    plan_draws(grants, amount_micros).map_or(0, |draws| promotional(&draws))
}

/// Takes `draws` out of the grants; spent-out grants are dropped.
pub(crate) fn take(grants: &mut GrantMap, draws: &[Draw]) -> Result<(), &'static str> {
    for d in draws {
        let g = grants
            .get_mut(&d.grant_id)
            .ok_or("draw from an unknown grant")?;
        g.remaining_micros = g
            .remaining_micros
            .checked_sub(d.micros)
            .ok_or("draw exceeds the grant")?;
        if g.remaining_micros == 0 {
            grants.remove(&d.grant_id);
        }
    }
    Ok(())
}

/// The live grant that money returned by `d` goes to: its own, else for a never-expiring
/// one the live grant of its terms. `None`: the grant comes back under its own id.
pub(crate) fn home_of(grants: &GrantMap, d: &Draw) -> Option<u64> {
    if grants.contains_key(&d.grant_id) {
        return Some(d.grant_id);
    }
    if d.terms.expires_at_ms.is_none() {
        return merge_target(grants, d.terms);
    }
    None
}

/// The never-expiring grant with these terms, if any (there is at most one).
pub(crate) fn merge_target(grants: &GrantMap, terms: GrantTerms) -> Option<u64> {
    if terms.expires_at_ms.is_some() {
        return None;
    }
    grants
        .iter()
        .find(|(_, g)| g.terms == terms)
        .map(|(id, _)| *id)
}

/// Returns `draws` to their grants (see the module's rules); returns the total.
pub(crate) fn give_back(grants: &mut GrantMap, draws: &[Draw]) -> Result<u64, &'static str> {
    let mut total = 0u64;
    for d in draws {
        total = total.checked_add(d.micros).ok_or("overflow")?;
        let id = home_of(grants, d).unwrap_or(d.grant_id);
        let g = grants.get_or_insert(
            id,
            Grant {
                amount_micros: 0,
                remaining_micros: 0,
                terms: d.terms,
                expiry_warned: false,
            },
        );
        g.remaining_micros = g.remaining_micros.checked_add(d.micros).ok_or("overflow")?;
        // A grant that comes back, or takes in money of a merged one, shows it as issued.
        g.amount_micros = g.amount_micros.max(g.remaining_micros);
    }
    Ok(total)
}

/// Splits `draws` (in draw order) into the first `micros` and the rest.
pub(crate) fn split_front(draws: &[Draw], micros: u64) -> (Vec<Draw>, Vec<Draw>) {
    let (mut front, mut back) = (Vec::new(), Vec::new());
    let mut left = micros;
    for d in draws {
        let here = d.micros.min(left);
        left -= here;
        if here > 0 {
            front.push(Draw { micros: here, ..*d });
        }
        if d.micros > here {
            back.push(Draw {
                micros: d.micros - here,
                ..*d
            });
        }
    }
    (front, back)
}

/// Splits `draws` into what stays (the front) and the last `micros` (the back, returned).
pub(crate) fn split_back(draws: &[Draw], micros: u64) -> (Vec<Draw>, Vec<Draw>) {
    let total: u64 = draws.iter().map(|d| d.micros).sum();
    split_front(draws, total.saturating_sub(micros))
}

/// Money returned by `draws` that lapses at `now_ms`: per grant that is gone and whose
/// expiry has passed (it would come back already expired), the micros, by grant id.
pub(crate) fn lapsing<'a>(
    grants: &GrantMap,
    draws: impl IntoIterator<Item = &'a Draw>,
    now_ms: TimestampMs,
) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for d in draws {
        if !grants.contains_key(&d.grant_id) && d.terms.is_due(now_ms) {
            *out.entry(d.grant_id).or_insert(0u64) += d.micros;
        }
    }
    out
}

/// Room for one more element in a `Vec` or `VecDeque`, growing one at a time while it
/// holds fewer than four: a cached agent record holds a few grants and refundable debits,
/// and the standard growth from empty reserves four of each (~500 bytes a record, ~50 MiB
/// across the default record cache). Past four the growth doubles as usual, so a busy agent's pushes
/// stay amortized O(1).
macro_rules! reserve_one {
    ($c:expr) => {
        if $c.len() == $c.capacity() && $c.len() < 4 {
            $c.reserve_exact(1);
        }
    };
}
pub(crate) use reserve_one;
