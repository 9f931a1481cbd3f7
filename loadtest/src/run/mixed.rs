//! The mixed scenario: chat fan-out, collaboration, a notification burst and
//! presence churn at the same time, each with its own table of the scenario file.
//! Their numbers are added up (latency histograms merged); each part's own numbers
//! are kept in the report under its name.

use super::{Ctx, chat, collab, notify, presence};
use crate::outcome::Outcome;

/// The `mixed` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let s = &ctx.scenario;
    let (c, e, n, p) = tokio::join!(
        chat::run_with(ctx, &s.chat, "mchat"),
        collab::run_with(ctx, &s.collab, "mcollab"),
        notify::run_with(ctx, &s.notify, "mnotify"),
        presence::run_with(ctx, &s.presence, "mpresence"),
    );
    let mut o = Outcome::default();
    o.merge("chat", c?);
    o.merge("collab", e?);
    o.merge("notify", n?);
    o.merge("presence", p?);
    Ok(o)
}
