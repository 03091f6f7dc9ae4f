//! `GET /__erulb__/`: the dashboard, one HTML page with its script and
//! style inside (no asset, no build step), built into the binary. The page
//! draws itself from the JSON endpoints (`/status`, `/domain`, `/upstream`,
//! `/stats`), which it polls every second, so it needs nothing else here.

use super::api::Answer;

const PAGE: &str = include_str!("dashboard.html");

pub(super) fn page() -> Answer {
    Answer::text("text/html; charset=utf-8", PAGE)
}
