//! How long calls wait, by oslo.messaging's rules: the default call timeout and the
//! bounds of timeouts and call-monitor intervals, which the client and the server
//! both apply.

use std::time::Duration;

/// How long a call waits for its reply unless told otherwise (oslo's
/// `rpc_response_timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The shortest call-monitor interval servers honour (oslo.messaging's rule).
pub const MIN_CALL_MONITOR: Duration = Duration::from_secs(2);
/// The longest timeout or call-monitor interval a client keeps (ten years); longer
/// ones, `Duration::MAX` included, are taken as this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 86_400);
