//! The handles without the feature `metrics`: they record nothing and cost nothing.

use super::{Handled, RejectReason, SlotLimit};
use crate::budget::ByteBudget;

#[derive(Clone)]
pub(crate) struct ClientMetrics;

impl ClientMetrics {
    pub(crate) fn for_topic(_topic: &str) -> Self {
        ClientMetrics
    }

    pub(crate) fn follow(&mut self, _topic: &str) {}

    pub(crate) fn call(&self, _method: &str) -> CallTimer {
        CallTimer
    }

    pub(crate) fn cast_sent(&self, _method: &str, _result: &crate::Result<()>) {}
}

pub(crate) struct CallTimer;

impl CallTimer {
    pub(crate) fn finish<T>(self, _result: &crate::Result<T>) {}
}

#[derive(Clone)]
pub(crate) struct ServerMetrics;

impl ServerMetrics {
    pub(crate) fn new<'a>(
        _topic: &str,
        _methods: impl IntoIterator<Item = &'a str>,
        _budget: ByteBudget,
    ) -> Self {
        ServerMetrics
    }

    pub(crate) fn handling(&self, _method: &str) -> HandlerTimer<'_> {
        HandlerTimer(std::marker::PhantomData)
    }

    pub(crate) fn rejected(&self, _reason: RejectReason) {}

    pub(crate) fn slot_wait(&self, _limit: SlotLimit) {}

    pub(crate) fn request_started(&self) -> RequestGuard {
        RequestGuard
    }
}

pub(crate) struct RequestGuard;

pub(crate) struct HandlerTimer<'a>(std::marker::PhantomData<&'a ()>);

impl HandlerTimer<'_> {
    pub(crate) fn finish(self, _handled: Handled) {}
}
