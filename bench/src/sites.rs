//! The `sites` section of `run`: many small sites against one big one, the
//! same number of events over the same days, in the embedded store alone
//! ([`crate::store_insert`]). The requirement: a site of 100 events
//! a day costs no more per event than a site of a million.

use serde::Serialize;

use crate::run::Ctx;
use crate::store_insert::{Measured, StoreInsertArgs, measure};

#[derive(Debug, Clone, Serialize)]
pub struct SitesSection {
    pub small: Measured,
    pub one: Measured,
    /// Small ÷ one: disk per event, fold rate, insert rate.
    pub disk_ratio: f64,
    pub fold_ratio: f64,
    pub insert_ratio: f64,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<SitesSection> {
    let (sites, per_day, days) = ctx.p.sites_case;
    let events = sites * per_day * days;
    let args = |sites: usize| StoreInsertArgs {
        events,
        batch: 5_000,
        users: ctx.p.stats_users,
        paths: ctx.p.stats_paths,
        dir: None,
        durable: false,
        sites,
        days,
        fold: true,
    };
    let mut measured = Vec::new();
    for n in [sites, 1] {
        let dir = tempfile::tempdir_in(&ctx.scratch)?;
        eprintln!("sites: {events} events over {n} site(s) and {days} days");
        let m = measure(&args(n), dir.path()).await?;
        eprintln!(
            "  insert {:.0} events/s, fold {:.0} events/s, {:.0} MiB per million events",
            m.insert_events_per_s,
            m.fold_events_per_s.unwrap_or(0.0),
            m.disk_mib_per_million
        );
        measured.push(m);
    }
    let one = measured.pop().expect("two cases");
    let small = measured.pop().expect("two cases");
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(SitesSection {
        disk_ratio: ratio(small.disk_mib_per_million, one.disk_mib_per_million),
        fold_ratio: ratio(
            small.fold_events_per_s.unwrap_or(0.0),
            one.fold_events_per_s.unwrap_or(0.0),
        ),
        insert_ratio: ratio(small.insert_events_per_s, one.insert_events_per_s),
        small,
        one,
    })
}
