//! The reference model: plans, a civil-date calendar of its own, and a ledger of
//! plain wide integers that follows DESIGN.md without calling into the core.
//!
//! Self-contained (it uses tally-core only to name answers and to build the plans, never
//! to compute an expected value), so that the core's model test and the store's
//! `engine_vs_model` test compile this same file.

use std::collections::BTreeMap;

use tally_core::{
    CommandError, CommandKind, Denial, GrantCategory, GrantTerms, Plan, PlanBook, PlanName,
    Priority, RateBucket, RateStatus, Status, Thresholds,
};

pub(crate) const MS_PER_DAY: u64 = 86_400_000;
pub(crate) const NANOS_PER_MS: u64 = 1_000_000;
pub(crate) const HOLD_TTL_MAX_MS: u64 = 3_600_000;
/// The core's `GRANTS_PER_AGENT_MAX` and `GRANT_PRIORITY_DEFAULT`, restated.
pub(crate) const MODEL_GRANTS_MAX: usize = 32;
pub(crate) const MODEL_PRIORITY_DEFAULT: u32 = 100;

// ---- the model's plans ---------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelBucket {
    pub(crate) quota: u32,
    pub(crate) window_ms: u64,
    pub(crate) burst: u32,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelPlan {
    pub(crate) name: &'static str,
    pub(crate) bucket: Option<ModelBucket>,
    pub(crate) cap_micros: Option<u64>,
    pub(crate) soft_pct: Option<u64>,
    pub(crate) anchor_day: u32,
    /// Notification thresholds: balance below, and a share of the cap (percent).
    pub(crate) low_below: Option<u64>,
    pub(crate) cap_alert_pct: Option<u64>,
}

pub(crate) const PLANS: [ModelPlan; 6] = [
    ModelPlan {
        name: "free",
        bucket: None,
        cap_micros: None,
        soft_pct: None,
        anchor_day: 1,
        low_below: None,
        cap_alert_pct: None,
    },
    ModelPlan {
        name: "capped",
        bucket: None,
        cap_micros: Some(20_000),
        soft_pct: Some(80),
        anchor_day: 1,
        low_below: Some(1_000),
        cap_alert_pct: Some(50),
    },
    ModelPlan {
        name: "metered",
        bucket: Some(ModelBucket {
            quota: 5,
            window_ms: 1_000,
            burst: 3,
        }),
        cap_micros: Some(10_000),
        soft_pct: Some(50),
        anchor_day: 15,
        low_below: None,
        cap_alert_pct: Some(75),
    },
    ModelPlan {
        name: "tight",
        bucket: Some(ModelBucket {
            quota: 1,
            window_ms: 2_000,
            burst: 1,
        }),
        cap_micros: None,
        soft_pct: None,
        anchor_day: 1,
        low_below: Some(300),
        cap_alert_pct: None,
    },
    ModelPlan {
        name: "capped15",
        bucket: None,
        cap_micros: Some(20_000),
        soft_pct: Some(80),
        anchor_day: 15,
        low_below: None,
        cap_alert_pct: None,
    },
    // A cell every 333.33 ms: waits that are not whole milliseconds, so that their
    // rounding (always up) shows.
    ModelPlan {
        name: "thirds",
        bucket: Some(ModelBucket {
            quota: 3,
            window_ms: 1_000,
            burst: 2,
        }),
        cap_micros: None,
        soft_pct: None,
        anchor_day: 1,
        low_below: None,
        cap_alert_pct: None,
    },
];

/// The plans an agent can be moved to: those without a rate bucket, so that a move
/// changes the anchor day and cap but never the shape of the limiter, whose volatile
/// state across such a change is not a rule of money.
pub(crate) const PLAN_MOVES: [usize; 3] = [0, 1, 4];

pub(crate) fn plan_name(i: usize) -> PlanName {
    PlanName::new(PLANS[i].name).expect("valid plan name")
}

/// The same plans, as the core's configuration.
pub(crate) fn plan_book() -> PlanBook {
    PlanBook::new(PLANS.iter().enumerate().map(|(i, m)| {
        let buckets = m
            .bucket
            .iter()
            .map(|b| RateBucket::new("default", b.quota, b.window_ms, b.burst).expect("bucket"))
            .collect();
        let mut p = Plan::unlimited(plan_name(i));
        p.buckets = buckets;
        p.monthly_cap_micros = m.cap_micros;
        p.soft_threshold_pct = m.soft_pct.map(|p| p as u8);
        p.anchor_day = m.anchor_day as u8;
        p.hold_ttl_max_ms = HOLD_TTL_MAX_MS;
        p.thresholds = Thresholds {
            balance_below_micros: m.low_below,
            cap_spend_percent: m.cap_alert_pct.map(|p| p as u8),
            grant_expiring_within_ms: None,
        };
        p.validate().expect("valid plan");
        p
    }))
}

// ---- the model's calendar (Howard Hinnant's days/civil algorithms) -----------------------

pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month) of the period containing `now_ms`: months start on `anchor_day`.
pub(crate) fn period_at(now_ms: u64, anchor_day: u32) -> (i64, u32) {
    let (y, m, d) = civil_from_days((now_ms / MS_PER_DAY) as i64);
    match (d < anchor_day, m) {
        (false, _) => (y, m),
        (true, 1) => (y - 1, 12),
        (true, _) => (y, m - 1),
    }
}

/// First ms of the period after `period`.
pub(crate) fn period_end_ms(period: (i64, u32), anchor_day: u32) -> u64 {
    let (y, m) = if period.1 == 12 {
        (period.0 + 1, 1)
    } else {
        (period.0, period.1 + 1)
    };
    days_from_civil(y, m, anchor_day) as u64 * MS_PER_DAY
}

// ---- the model ledger --------------------------------------------------------------------

/// A grant's terms: (expiry, priority, category).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelTerms {
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) priority: u32,
    pub(crate) paid: bool,
}

impl ModelTerms {
    pub(crate) const PLAIN: ModelTerms = ModelTerms {
        expires_at_ms: None,
        priority: MODEL_PRIORITY_DEFAULT,
        paid: true,
    };

    pub(crate) fn of(t: &GrantTerms) -> Self {
        ModelTerms {
            expires_at_ms: t.expires_at_ms,
            priority: t.priority,
            paid: t.category == GrantCategory::Paid,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelGrant {
    pub(crate) amount: u64,
    pub(crate) remaining: u64,
    pub(crate) terms: ModelTerms,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelHold {
    pub(crate) amount: u64,
    pub(crate) expires_at_ms: u64,
    /// (grant id, micros) in draw order.
    pub(crate) draws: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelDebit {
    pub(crate) remaining: u64,
    pub(crate) period: (i64, u32),
    pub(crate) draws: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ModelAgent {
    pub(crate) plan: usize,
    pub(crate) suspended: bool,
    pub(crate) balance: i128,
    pub(crate) holds: BTreeMap<u64, ModelHold>,
    pub(crate) debits: BTreeMap<u64, ModelDebit>,
    pub(crate) spend: BTreeMap<(i64, u32), u128>,
    /// The newest period the agent spent in; spends never count in an older one.
    pub(crate) period: (i64, u32),
    pub(crate) credited: u128,
    pub(crate) debited: u128,
    pub(crate) refunded: u128,
    pub(crate) expired: u128,
    /// Debits and captures drawn from promotional grants.
    pub(crate) debited_promotional: u128,
    pub(crate) seq: u64,
    /// governor's theoretical arrival time, ns; volatile.
    pub(crate) tat_ns: Option<u64>,
    pub(crate) grants: BTreeMap<u64, ModelGrant>,
    /// The terms of every grant ever drawn from, by id (for money that comes back).
    pub(crate) terms: BTreeMap<u64, ModelTerms>,
}

/// What the model expects a command to answer: the outcome, and the `RateLimit` status
/// (`rate`) that comes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expect {
    Approved {
        events: u32,
        /// The receipt's amount: the money the first event moves (the captured part of a
        /// capture, the released amount of a void or of the first expiry).
        amount: u64,
        balance: u64,
        held: u64,
        /// A new hold's expiry.
        hold_expires_at_ms: Option<u64>,
        /// The agent's bucket after a debit or a hold took its cell.
        rate: Option<RateStatus>,
    },
    WouldApprove {
        amount: u64,
        balance: u64,
        /// The agent's bucket as the check found it (a check takes no cell).
        rate: Option<RateStatus>,
    },
    /// A denial carries no status of its own: a 429's `RateLimit` header is made from the
    /// denial's bucket and wait, which the denial itself is compared on.
    Denied {
        denial: Denial,
        rate: Option<RateStatus>,
    },
}

impl Expect {
    pub(crate) fn denied(denial: Denial) -> Self {
        Expect::Denied { denial, rate: None }
    }
}

pub(crate) const U64_MAX: u128 = u64::MAX as u128;

/// `a + b` must fit the core's 64-bit counters.
pub(crate) fn fits(a: u128, b: u128) -> Result<u128, CommandError> {
    let sum = a + b;
    if sum > U64_MAX {
        Err(CommandError::Overflow)
    } else {
        Ok(sum)
    }
}

/// GCRA as governor 0.10 writes it (TAT starts at `now`, τ = T × (burst − 1)): one request
/// at `now_ms`, refused with the whole milliseconds to wait; `take` uses the cell on admit.
fn gcra(b: ModelBucket, tat_ns: &mut Option<u64>, now_ms: u64, take: bool) -> Result<(), u64> {
    let t = b.window_ms * NANOS_PER_MS / u64::from(b.quota);
    let tau = t * u64::from(b.burst - 1);
    let now = now_ms * NANOS_PER_MS;
    let tat = tat_ns.unwrap_or(now);
    let earliest = tat.saturating_sub(tau);
    if now < earliest {
        return Err((earliest - now).div_ceil(NANOS_PER_MS));
    }
    if take {
        *tat_ns = Some(tat.max(now) + t);
    }
    Ok(())
}

impl ModelAgent {
    pub(crate) fn plan(&self) -> ModelPlan {
        PLANS[self.plan]
    }

    pub(crate) fn held(&self) -> u128 {
        self.holds.values().map(|h| u128::from(h.amount)).sum()
    }

    /// The period a spend at `now_ms` counts in: the calendar's, unless the agent already
    /// spends in a later one (its plan's anchor day moved later since).
    pub(crate) fn period_now(&self, now_ms: u64) -> (i64, u32) {
        period_at(now_ms, self.plan().anchor_day).max(self.period)
    }

    pub(crate) fn spent_at(&self, now_ms: u64) -> u128 {
        let period = self.period_now(now_ms);
        self.spend.get(&period).copied().unwrap_or(0)
    }

    pub(crate) fn balance_u64(&self) -> u64 {
        u64::try_from(self.balance).expect("model balance fits u64")
    }

    pub(crate) fn held_u64(&self) -> u64 {
        u64::try_from(self.held()).expect("model held fits u64")
    }

    /// An approval that moved `amount` (see [`Expect::Approved`]), of no hold and no
    /// rate-limited spend.
    pub(crate) fn approved(&mut self, events: u32, amount: u64) -> Expect {
        self.approved_with(events, amount, None, None)
    }

    pub(crate) fn approved_with(
        &mut self,
        events: u32,
        amount: u64,
        hold_expires_at_ms: Option<u64>,
        rate: Option<RateStatus>,
    ) -> Expect {
        self.seq += u64::from(events);
        Expect::Approved {
            events,
            amount,
            balance: self.balance_u64(),
            held: self.held_u64(),
            hold_expires_at_ms,
            rate,
        }
    }

    /// The plan's bucket, if any, asked for a request at `now_ms`.
    pub(crate) fn rate(&mut self, now_ms: u64, take: bool) -> Result<(), Denial> {
        let Some(b) = self.plan().bucket else {
            return Ok(());
        };
        gcra(b, &mut self.tat_ns, now_ms, take).map_err(|retry_after_ms| Denial::RateLimited {
            bucket: "default".into(),
            quota: b.quota,
            window_ms: b.window_ms,
            retry_after_ms,
        })
    }

    /// The `RateLimit` status of the plan's bucket at `now_ms`, found by asking the
    /// model's GCRA on a copy of the agent's TAT rather than by a formula of its own:
    /// `remaining` is how many requests it would still admit at this instant, one after
    /// another; `next_refill_ms` is the wait the next one would then be told (0 when the
    /// bucket is full), which is when one request more than `remaining` is available.
    pub(crate) fn rate_status(&self, now_ms: u64) -> Option<RateStatus> {
        let b = self.plan().bucket?;
        let mut probe = self.tat_ns;
        let mut remaining = 0u32;
        let next_refill_ms = loop {
            if remaining == b.burst {
                break 0;
            }
            match gcra(b, &mut probe, now_ms, true) {
                Ok(()) => remaining += 1,
                Err(wait_ms) => break wait_ms,
            }
        };
        Some(RateStatus {
            bucket: "default".into(),
            quota: b.quota,
            window_ms: b.window_ms,
            remaining: u64::from(remaining),
            next_refill_ms,
        })
    }

    /// Suspended → rate limit → monthly cap (and the soft threshold for low) → funds.
    pub(crate) fn gate(
        &mut self,
        amount: u64,
        priority: Priority,
        now_ms: u64,
        take: bool,
    ) -> Result<(), Denial> {
        if self.suspended {
            return Err(Denial::Suspended);
        }
        self.rate(now_ms, take)?;
        let plan = self.plan();
        if let Some(cap) = plan.cap_micros {
            let spent = self.spent_at(now_ms);
            let held = self.held();
            let committed = spent + held + u128::from(amount);
            let soft_limit = match (priority, plan.soft_pct) {
                (Priority::Low, Some(pct)) => {
                    Some(u64::try_from(u128::from(cap) * u128::from(pct) / 100).expect("fits"))
                }
                _ => None,
            };
            let limit = if committed > u128::from(cap) {
                Some((cap, false))
            } else {
                soft_limit
                    .filter(|l| committed > u128::from(*l))
                    .map(|l| (l, true))
            };
            if let Some((limit_micros, soft)) = limit {
                let period = self.period_now(now_ms);
                return Err(Denial::MonthlyCapReached {
                    cap_micros: cap,
                    limit_micros,
                    spent_micros: u64::try_from(spent).expect("fits"),
                    held_micros: u64::try_from(held).expect("fits"),
                    resets_at_ms: period_end_ms(period, plan.anchor_day),
                    soft,
                });
            }
        }
        if i128::from(amount) > self.balance {
            // Retry-After only if holds expiring on their own would free enough, counting
            // only money whose grant still lives then (what comes back to a grant gone by
            // then lapses). By brute force: the balance recomputed at each release time.
            let lives = |terms: &ModelTerms, t: u64| terms.expires_at_ms.is_none_or(|at| at > t);
            let mut times: Vec<u64> = self
                .holds
                .values()
                .map(|h| h.expires_at_ms.max(now_ms))
                .collect();
            times.sort_unstable();
            let retry_after_ms = times.into_iter().find_map(|t| {
                let live: i128 = self
                    .grants
                    .iter()
                    .filter(|(_, g)| lives(&g.terms, t))
                    .map(|(_, g)| i128::from(g.remaining))
                    .sum();
                let back: i128 = self
                    .holds
                    .values()
                    .filter(|h| h.expires_at_ms.max(now_ms) <= t)
                    .flat_map(|h| h.draws.iter())
                    .filter(|(id, _)| lives(&self.terms[id], t))
                    .map(|(_, micros)| i128::from(*micros))
                    .sum();
                (live + back >= i128::from(amount)).then(|| t.saturating_sub(now_ms))
            });
            return Err(Denial::InsufficientFunds {
                required_micros: amount,
                available_micros: self.balance_u64(),
                balance_micros: self.balance_u64(),
                held_micros: self.held_u64(),
                retry_after_ms,
            });
        }
        Ok(())
    }

    pub(crate) fn spend(&mut self, amount: u64, now_ms: u64, seq: u64, draws: Vec<(u64, u64)>) {
        for (id, micros) in &draws {
            if !self.terms[id].paid {
                self.debited_promotional += u128::from(*micros);
            }
        }
        let period = self.period_now(now_ms);
        *self.spend.entry(period).or_default() += u128::from(amount);
        self.debited += u128::from(amount);
        if amount > 0 {
            // A capture of nothing spends nothing, and starts no period.
            self.period = period;
            self.debits.insert(
                seq,
                ModelDebit {
                    remaining: amount,
                    period,
                    draws,
                },
            );
        }
    }

    /// Grants in the order a spend draws from them: priority, then the earliest expiry
    /// (never after any date), then the oldest.
    pub(crate) fn grant_order(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.grants.keys().copied().collect();
        ids.sort_by(|a, b| {
            let (ta, tb) = (self.grants[a].terms, self.grants[b].terms);
            let by_expiry = match (ta.expires_at_ms, tb.expires_at_ms) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            ta.priority.cmp(&tb.priority).then(by_expiry).then(a.cmp(b))
        });
        ids
    }

    /// Takes `amount` from the grants in order; empty ones go.
    fn take(&mut self, amount: u64) -> Vec<(u64, u64)> {
        let mut left = amount;
        let mut draws = Vec::new();
        for id in self.grant_order() {
            if left == 0 {
                break;
            }
            let g = self.grants.get_mut(&id).expect("listed");
            let t = g.remaining.min(left);
            g.remaining -= t;
            left -= t;
            draws.push((id, t));
            if g.remaining == 0 {
                self.grants.remove(&id);
            }
        }
        assert_eq!(left, 0, "the model spends only what its grants hold");
        self.balance -= i128::from(amount);
        draws
    }

    /// Money back to grant `id`: to it if live; a never-expiring one's to the live grant
    /// of the same terms; else the grant comes back with its terms.
    fn give(&mut self, id: u64, micros: u64) {
        let terms = self.terms[&id];
        let home = if self.grants.contains_key(&id) || terms.expires_at_ms.is_some() {
            id
        } else {
            self.grants
                .iter()
                .find(|(_, g)| g.terms == terms)
                .map_or(id, |(i, _)| *i)
        };
        let g = self.grants.entry(home).or_insert(ModelGrant {
            amount: 0,
            remaining: 0,
            terms,
        });
        g.remaining += micros;
        g.amount = g.amount.max(g.remaining);
        self.balance += i128::from(micros);
    }

    /// Every grant due at `now` expires (in id order): the number of expiries.
    fn expire_grants(&mut self, now: u64) -> Result<u32, CommandError> {
        self.expire_grants_first(now).map(|(n, _)| n)
    }

    /// [`Self::expire_grants`], and the money the first expiry took.
    fn expire_grants_first(&mut self, now: u64) -> Result<(u32, u64), CommandError> {
        let due: Vec<u64> = self
            .grants
            .iter()
            .filter(|(_, g)| g.terms.expires_at_ms.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        let sum: u128 = due
            .iter()
            .map(|id| u128::from(self.grants[id].remaining))
            .sum();
        fits(self.expired, sum)?;
        let first = due.first().map_or(0, |id| self.grants[id].remaining);
        for id in &due {
            let g = self.grants.remove(id).expect("due");
            self.balance -= i128::from(g.remaining);
            self.expired += u128::from(g.remaining);
        }
        Ok((due.len() as u32, first))
    }

    /// Whether a grant on `terms` merges, or fits under the limit.
    fn room_for(&self, terms: ModelTerms) -> Result<(), CommandError> {
        let merges =
            terms.expires_at_ms.is_none() && self.grants.values().any(|g| g.terms == terms);
        if !merges && self.grants.len() >= MODEL_GRANTS_MAX {
            return Err(CommandError::TooManyGrants {
                max: MODEL_GRANTS_MAX,
            });
        }
        Ok(())
    }

    fn issue(&mut self, seq: u64, amount: u64, terms: ModelTerms) {
        let merge = self
            .grants
            .iter()
            .find(|(_, g)| terms.expires_at_ms.is_none() && g.terms == terms)
            .map(|(id, _)| *id);
        match merge {
            Some(id) => {
                let g = self.grants.get_mut(&id).expect("found");
                g.amount = g.amount.saturating_add(amount);
                g.remaining += amount;
            }
            None => {
                self.grants.insert(
                    seq,
                    ModelGrant {
                        amount,
                        remaining: amount,
                        terms,
                    },
                );
                self.terms.insert(seq, terms);
            }
        }
        self.credited += u128::from(amount);
        self.balance += i128::from(amount);
    }

    /// A command, with the expiry of due grants first for those that move money: on
    /// approval the expiries are journaled ahead of the command's own entries; on a
    /// denial or an error nothing but the limiter's state changes.
    /// One command, and the notifications it journals after its own entries: a fall of
    /// the balance below the plan's `low_below`, a rise of the period's spend to its
    /// `cap_alert_pct` share of the cap (DESIGN.md, "Billing stacks").
    pub(crate) fn step(
        &mut self,
        kind: &CommandKind,
        prio: Priority,
        now: u64,
    ) -> Result<Expect, CommandError> {
        let plan = self.plan();
        let balance_before = self.balance;
        let period = self.period_now(now);
        let spent_before = self.spend.get(&period).copied().unwrap_or(0);
        let mut result = self.step_without_notices(kind, prio, now)?;
        if let Expect::Approved { events, .. } = &mut result {
            let mut notices = 0;
            if let Some(low) = plan.low_below.map(i128::from) {
                if balance_before >= low && self.balance < low {
                    notices += 1;
                }
            }
            if let (Some(pct), Some(cap)) = (plan.cap_alert_pct, plan.cap_micros) {
                let alert = u128::from(cap) * u128::from(pct) / 100;
                let spent_after = self.spend.get(&period).copied().unwrap_or(0);
                if spent_before < alert && spent_after >= alert {
                    notices += 1;
                }
            }
            *events += notices;
            self.seq += u64::from(notices);
        }
        Ok(result)
    }

    fn step_without_notices(
        &mut self,
        kind: &CommandKind,
        prio: Priority,
        now: u64,
    ) -> Result<Expect, CommandError> {
        let moves_money = matches!(
            kind,
            CommandKind::Credit { .. }
                | CommandKind::IssueGrant { .. }
                | CommandKind::Debit { .. }
                | CommandKind::Check { .. }
                | CommandKind::Hold { .. }
                | CommandKind::Capture { .. }
                | CommandKind::Void { .. }
                | CommandKind::ExpireHolds
                | CommandKind::Refund { .. }
        );
        if !moves_money {
            return self.step_after_expiry(kind, prio, now);
        }
        let mut next = self.clone();
        let result = next.expire_then_step(kind, prio, now);
        match result {
            Ok(Expect::Approved { .. }) => *self = next,
            _ => self.tat_ns = next.tat_ns,
        }
        result
    }

    fn expire_then_step(
        &mut self,
        kind: &CommandKind,
        prio: Priority,
        now: u64,
    ) -> Result<Expect, CommandError> {
        let (expired, first) = self.expire_grants_first(now)?;
        self.seq += u64::from(expired);
        let mut result = self.step_after_expiry(kind, prio, now)?;
        if let Expect::Approved { events, amount, .. } = &mut result {
            if *events == 0 {
                // A sweep with only grants to expire: the receipt is of the first.
                *amount = first;
            }
            *events += expired;
        }
        Ok(result)
    }

    fn step_after_expiry(
        &mut self,
        kind: &CommandKind,
        prio: Priority,
        now: u64,
    ) -> Result<Expect, CommandError> {
        let next = self.seq + 1;
        match *kind {
            CommandKind::CreateAgent { .. } => Err(CommandError::AgentExists),
            CommandKind::UpdateAgent {
                ref plan, status, ..
            } => {
                if let Some(p) = plan {
                    self.plan = PLANS
                        .iter()
                        .position(|m| m.name == p.as_str())
                        .ok_or_else(|| CommandError::UnknownPlan(p.to_string()))?;
                }
                if let Some(s) = status {
                    self.suspended = s == Status::Suspended;
                }
                Ok(self.approved(1, 0))
            }
            CommandKind::Credit { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                self.room_for(ModelTerms::PLAIN)?;
                fits(self.credited, a.into())?;
                fits(self.balance as u128, a.into())?;
                self.issue(next, a, ModelTerms::PLAIN);
                Ok(self.approved(1, a))
            }
            CommandKind::IssueGrant {
                amount_micros: a,
                ref terms,
            } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                if let Some(at) = terms.expires_at_ms {
                    if at <= now {
                        return Err(CommandError::GrantExpiryNotInFuture {
                            expires_at_ms: at,
                            now_ms: now,
                        });
                    }
                }
                let terms = ModelTerms::of(terms);
                self.room_for(terms)?;
                fits(self.credited, a.into())?;
                fits(self.balance as u128, a.into())?;
                self.issue(next, a, terms);
                Ok(self.approved(1, a))
            }
            CommandKind::Debit { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                if let Err(d) = self.gate(a, prio, now, true) {
                    return Ok(Expect::denied(d));
                }
                fits(self.debited, a.into())?;
                fits(self.spent_at(now), a.into())?;
                let draws = self.take(a);
                self.spend(a, now, next, draws);
                let rate = self.rate_status(now);
                Ok(self.approved_with(1, a, None, rate))
            }
            CommandKind::Check { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                Ok(match self.gate(a, prio, now, false) {
                    Ok(()) => Expect::WouldApprove {
                        amount: a,
                        balance: self.balance_u64(),
                        rate: self.rate_status(now),
                    },
                    Err(d) => Expect::denied(d),
                })
            }
            CommandKind::Hold {
                amount_micros: a,
                ttl_ms,
            } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                if ttl_ms == 0 || ttl_ms > HOLD_TTL_MAX_MS {
                    return Err(CommandError::InvalidTtl {
                        ttl_ms,
                        max_ms: HOLD_TTL_MAX_MS,
                    });
                }
                if let Err(d) = self.gate(a, prio, now, true) {
                    return Ok(Expect::denied(d));
                }
                fits(self.held(), a.into())?;
                let draws = self.take(a);
                let expires_at_ms = now + ttl_ms;
                self.holds.insert(
                    next,
                    ModelHold {
                        amount: a,
                        expires_at_ms,
                        draws,
                    },
                );
                let rate = self.rate_status(now);
                Ok(self.approved_with(1, a, Some(expires_at_ms), rate))
            }
            CommandKind::Capture {
                hold_seq,
                amount_micros: a,
            } => {
                let hold = self
                    .holds
                    .get(&hold_seq)
                    .cloned()
                    .ok_or(CommandError::UnknownHold(hold_seq))?;
                if now >= hold.expires_at_ms {
                    return Err(CommandError::HoldExpired {
                        hold_seq,
                        expires_at_ms: hold.expires_at_ms,
                    });
                }
                if a > hold.amount {
                    return Err(CommandError::CaptureExceedsHold {
                        amount_micros: a,
                        held_micros: hold.amount,
                    });
                }
                let released = hold.amount - a;
                fits(self.debited, a.into())?;
                fits(self.spent_at(now), a.into())?;
                fits(self.balance as u128, released.into())?;
                self.holds.remove(&hold_seq);
                // The reservation is spent from its first draw on; the rest goes back.
                let (mut captured, mut left) = (Vec::new(), a);
                for (id, micros) in hold.draws {
                    let t = micros.min(left);
                    left -= t;
                    if t > 0 {
                        captured.push((id, t));
                    }
                    if micros > t {
                        self.give(id, micros - t);
                    }
                }
                self.spend(a, now, next, captured);
                let lapsed = self.expire_grants(now)?;
                Ok(self.approved(1 + lapsed, a))
            }
            CommandKind::Void { hold_seq } => {
                let hold = self
                    .holds
                    .remove(&hold_seq)
                    .ok_or(CommandError::UnknownHold(hold_seq))?;
                fits(self.balance as u128, hold.amount.into())?;
                for (id, micros) in hold.draws {
                    self.give(id, micros);
                }
                let lapsed = self.expire_grants(now)?;
                Ok(self.approved(1 + lapsed, hold.amount))
            }
            CommandKind::ExpireHolds => {
                let due: Vec<u64> = self
                    .holds
                    .iter()
                    .filter(|(_, h)| h.expires_at_ms <= now)
                    .map(|(s, _)| *s)
                    .collect();
                let freed: u128 = due.iter().map(|s| u128::from(self.holds[s].amount)).sum();
                fits(self.balance as u128, freed)?;
                // Expired in order of their seqs; the receipt names the first one's amount.
                let first = due.first().map_or(0, |s| self.holds[s].amount);
                for s in &due {
                    let h = self.holds.remove(s).expect("due hold is open");
                    for (id, micros) in h.draws {
                        self.give(id, micros);
                    }
                }
                let lapsed = self.expire_grants(now)?;
                Ok(self.approved(due.len() as u32 + lapsed, first))
            }
            // Recorded whatever the status, limits or cap: the call already happened.
            CommandKind::RecordUnsettledPayment { amount_micros: a } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                Ok(self.approved(1, a))
            }
            // API keys and thresholds move no money; tests/edges/ covers them.
            CommandKind::IssueApiKey { .. }
            | CommandKind::RevokeApiKey { .. }
            | CommandKind::SetThresholds { .. } => {
                panic!("the model generates no API key or threshold commands")
            }
            CommandKind::Refund {
                debit_seq,
                amount_micros: a,
            } => {
                if a == 0 {
                    return Err(CommandError::ZeroAmount);
                }
                let debit = self
                    .debits
                    .get(&debit_seq)
                    .cloned()
                    .ok_or(CommandError::UnknownDebit(debit_seq))?;
                if a > debit.remaining {
                    return Err(CommandError::RefundExceedsDebit {
                        amount_micros: a,
                        refundable_micros: debit.remaining,
                    });
                }
                fits(self.refunded, a.into())?;
                fits(self.balance as u128, a.into())?;
                self.refunded += u128::from(a);
                // A refund undoes the spend from its last draw backwards.
                let (mut kept, mut returned, mut left) = (debit.draws.clone(), Vec::new(), a);
                for d in kept.iter_mut().rev() {
                    let t = d.1.min(left);
                    left -= t;
                    d.1 -= t;
                    if t > 0 {
                        returned.push((d.0, t));
                    }
                }
                kept.retain(|d| d.1 > 0);
                for (id, micros) in returned.into_iter().rev() {
                    self.give(id, micros);
                }
                let entry = self.debits.get_mut(&debit_seq).expect("exists");
                entry.remaining -= a;
                entry.draws = kept;
                let spent = self.spend.entry(debit.period).or_default();
                *spent = spent.saturating_sub(u128::from(a));
                let lapsed = self.expire_grants(now)?;
                Ok(self.approved(1 + lapsed, a))
            }
        }
    }
}
