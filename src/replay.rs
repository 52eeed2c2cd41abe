//! Event streams that resume: the bus's in-memory ring for recent events, and the persisted
//! event log (the store) for a resume point the ring no longer holds.
//!
//! SSE and WebSocket links both read through [`EventStream`]. A client that resumes after an id
//! older than the ring first receives the events the log holds between that id and the ring's
//! oldest event, then the ring's replay, then live events: in order, without a gap and without a
//! duplicate (positions below the ring's oldest come from the log, the rest from the ring, and
//! live events at or below the replay's position are skipped by the bus subscription). When the
//! log does not hold the id either, its `(node, seq)` index tells where to start: an id seen live
//! but never stored (the node was killed before the store wrote it) resumes after the newest
//! stored event of its node below it, without a marker (nothing is lost, a few events may come
//! again); an id retention deleted starts with an `events.lagged` marker, then the log from its
//! oldest event. Only an id of a node the log never stored starts with the marker and the ring
//! alone. The gap is read page by page as the client
//! consumes it, so a long gap costs one page of memory, not the whole gap. When retention
//! deletes events of the gap while the client reads it, the stream says so with an
//! `events.lagged` marker where they would have been (resume after the last event delivered),
//! then goes on with what the log still holds.

use std::collections::VecDeque;
use std::sync::Arc;

use troupe_actors::event::{
    Delivery, Event, EventBus, EventFilter, EventsLagged, FilterSet, ReplayFrom, Subscription,
};
use troupe_actors::kernel::CallError;

use crate::store::{Store, UnstoredCursor};

/// Events read from the log per page while filling a gap (at most: a page also ends at
/// [`MAX_EVENT_PAGE_BYTES`](crate::store::MAX_EVENT_PAGE_BYTES) of events, with `more` set).
const GAP_PAGE: usize = 1_000;

/// An event subscription that fills a resume gap from the event log. It filters with a link's
/// [`FilterSet`]: the bus and the log filter on the set's cover, the stream applies the set
/// exactly.
pub struct EventStream {
    filters: FilterSet,
    /// A marker to deliver first (the log could not fill the gap either).
    marker: Option<EventsLagged>,
    gap: Option<Gap>,
    live: Subscription,
    store: Store,
    /// Where a stream that does not resume starts: the newest event on the bus when it opened
    /// (any kind, any filter). `None` for a resume, which starts at its own id.
    starts_after: Option<troupe_actors::event::EventId>,
}

/// What one attempt to open a stream gave.
enum Opened {
    Stream(Box<EventStream>),
    /// The cursor is not stored; the log holds this earlier event of its node.
    ResumeAfter(troupe_actors::event::EventId),
}

/// The part of a resume that comes from the event log.
struct Gap {
    filter: EventFilter,
    /// Continue after this arrival position.
    after_pos: u64,
    /// The ring's oldest position: events from here on come from the ring.
    until_pos: u64,
    buffer: VecDeque<Arc<Event>>,
    /// More of the log may follow `after_pos`.
    more: bool,
    /// The id of the last event delivered from the gap, for a marker if reading fails.
    last_delivered: Option<troupe_actors::event::EventId>,
}

impl EventStream {
    /// Where a stream that does not resume (it starts now, or with a tail) starts: the newest
    /// event on the bus when it opened, whatever its filter, for a client to resume after even
    /// when nothing matched its filter yet. `None` for a resume (and on a bus with no events).
    pub fn starts_after(&self) -> Option<&troupe_actors::event::EventId> {
        self.starts_after.as_ref()
    }

    /// Subscribes from `start`: a replay (from the log as far as needed), then live events.
    pub async fn open(
        bus: &EventBus,
        store: &Store,
        start: ReplayFrom,
        filters: FilterSet,
    ) -> Result<Self, CallError> {
        let mut start = start;
        loop {
            match Self::open_once(bus, store, start, filters.clone()).await? {
                Opened::Stream(stream) => return Ok(*stream),
                // Each round resumes after an id of a lower sequence number, so this ends.
                Opened::ResumeAfter(stored) => start = ReplayFrom::After(stored),
            }
        }
    }

    /// One attempt of [`EventStream::open`]: the stream, or a stored id to resume after instead
    /// (the log does not hold the cursor, but an earlier event of its node).
    async fn open_once(
        bus: &EventBus,
        store: &Store,
        start: ReplayFrom,
        filters: FilterSet,
    ) -> Result<Opened, CallError> {
        let filter = filters.cover();
        let (live, replay) = bus.subscribe_from(start.clone(), filter.clone()).await?;
        let mut stream = Self {
            filters,
            marker: None,
            gap: None,
            live,
            store: store.clone(),
            starts_after: match start {
                ReplayFrom::After(_) | ReplayFrom::NodeAfter(_) => None,
                ReplayFrom::Now | ReplayFrom::Tail(_) => replay.newest.clone(),
            },
        };
        let ReplayFrom::After(cursor) = start else {
            return Ok(Opened::Stream(Box::new(stream)));
        };
        let Some(mut marker) = stream.live.take_gap_marker() else {
            return Ok(Opened::Stream(Box::new(stream)));
        };
        // Everything the bus accepted before the replay is queued for the log; make it durable
        // so the log holds every event below the ring's oldest.
        if let Err(error) = store.flush().await {
            tracing::warn!(%error, "cannot flush the event log before a replay");
        }
        let until_pos = replay.oldest_pos.unwrap_or(replay.through_pos + 1);
        match store.events_after(&cursor, &filter, GAP_PAGE).await {
            Ok(page) if page.found => {
                let mut gap = Gap {
                    filter,
                    after_pos: page.through_pos,
                    until_pos,
                    buffer: VecDeque::new(),
                    more: page.more,
                    last_delivered: Some(cursor),
                };
                gap.take(page.events);
                stream.gap = Some(gap);
            }
            Ok(_) => match store.unstored_cursor(&cursor).await {
                // Seen live but never stored: everything after the node's previous stored event
                // is what the client may lack (a few it has may come again, none is lost).
                Ok(UnstoredCursor::After(stored)) => return Ok(Opened::ResumeAfter(stored)),
                // Retention deleted the cursor: what is left of the gap comes from the log's
                // oldest event on, after the marker.
                Ok(UnstoredCursor::Oldest { oldest_pos, missed }) if oldest_pos < until_pos => {
                    // The ring counted the events up to its oldest; those the log holds come.
                    marker.missed = missed;
                    stream.marker = Some(marker);
                    stream.gap = Some(Gap {
                        filter,
                        after_pos: oldest_pos.saturating_sub(1),
                        until_pos,
                        buffer: VecDeque::new(),
                        more: true,
                        last_delivered: Some(cursor),
                    });
                }
                // The log holds nothing before the ring: the ring's marker says it all.
                Ok(UnstoredCursor::Oldest { .. } | UnstoredCursor::Unknown) => {
                    stream.marker = Some(marker)
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the event log for a replay");
                    stream.marker = Some(marker);
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot read the event log for a replay");
                stream.marker = Some(marker);
            }
        }
        Ok(Opened::Stream(Box::new(stream)))
    }

    /// The next delivery; `None` once the node's bus is gone.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            let delivery = match self.next_from_log().await {
                Some(delivery) => delivery,
                None => self.live.recv().await?,
            };
            if self.passes(&delivery) {
                return Some(delivery);
            }
        }
    }

    /// The next delivery if one is ready without waiting (to batch writes). Never reads the
    /// log: while a gap is being filled it answers `None` and [`EventStream::recv`] goes on.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        loop {
            if self.marker.is_some() {
                return None;
            }
            let delivery = match &mut self.gap {
                Some(gap) => {
                    let event = gap.buffer.pop_front()?;
                    gap.last_delivered = Some(event.id.clone());
                    Delivery::Event(event)
                }
                None => self.live.try_recv()?,
            };
            if self.passes(&delivery) {
                return Some(delivery);
            }
        }
    }

    /// The replay only, without live events: the log's part, then the ring's; `None` at its end.
    pub async fn next_replayed(&mut self) -> Option<Delivery> {
        loop {
            let delivery = match self.next_from_log().await {
                Some(delivery) => delivery,
                None => self.live.take_next_backlog()?,
            };
            if self.passes(&delivery) {
                return Some(delivery);
            }
        }
    }

    /// Replaces the subscriptions (a client changed them). Applies to the log pages not read
    /// yet and to live events.
    pub fn set_filters(&mut self, filters: FilterSet) {
        let cover = filters.cover();
        if let Some(gap) = &mut self.gap {
            gap.buffer.retain(|event| cover.matches(event));
            gap.filter = cover.clone();
        }
        self.live.set_filter(cover);
        self.filters = filters;
    }

    /// The current subscriptions.
    pub fn filters(&self) -> &FilterSet {
        &self.filters
    }

    /// True when `delivery` passes the link's subscriptions. The bus and the log already
    /// applied their cover (also to what they held when it last changed), so a set that is its
    /// own cover needs no second check.
    fn passes(&self, delivery: &Delivery) -> bool {
        match delivery {
            Delivery::Event(_) if self.filters.is_its_cover() => true,
            Delivery::Event(event) => self.filters.matches(event),
            Delivery::Lagged(_) => true,
        }
    }

    /// The gap is over: live events follow, and a lag of theirs resumes after what the gap
    /// delivered.
    fn end_gap(&mut self) {
        if let Some(last) = self.gap.take().and_then(|gap| gap.last_delivered) {
            self.live.delivered(last);
        }
    }

    /// The marker, then the gap; `None` once both are done.
    async fn next_from_log(&mut self) -> Option<Delivery> {
        if let Some(marker) = self.marker.take() {
            return Some(Delivery::Lagged(marker));
        }
        loop {
            let gap = self.gap.as_mut()?;
            if let Some(event) = gap.buffer.pop_front() {
                gap.last_delivered = Some(event.id.clone());
                return Some(Delivery::Event(event));
            }
            if !gap.more {
                self.end_gap();
                return None;
            }
            match read_page(&self.store, gap).await {
                Ok((page, oldest)) => {
                    let lost = gap.lost(&page, oldest);
                    gap.after_pos = page.through_pos;
                    gap.more = page.more;
                    gap.take(page.events);
                    if lost > 0 {
                        // Retention deleted events of the gap before this page was read: say
                        // so where they would have been, then go on with what is left.
                        return Some(Delivery::Lagged(EventsLagged {
                            missed: lost,
                            resume_after: gap.last_delivered.clone(),
                        }));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the event log while filling a replay");
                    let resume_after = gap.last_delivered.clone();
                    self.end_gap();
                    return Some(Delivery::Lagged(EventsLagged {
                        missed: 0,
                        resume_after,
                    }));
                }
            }
        }
    }
}

/// The next page of a gap, then the log's oldest position (see [`Gap::lost`]).
///
/// A later page continues by position, not by id, so nothing in it shows that retention deleted
/// events after `after_pos` since the previous page. Arrival positions are handed out one by one
/// by the bus, but the log may have holes (appends dropped for a slow disk, a failed batch), so
/// the page's first position does not tell either; the log's oldest position does: retention
/// deletes from the oldest on, and the log held `after_pos` when the previous page was read.
/// The oldest position is read after the page: it only grows, so a deletion the page missed
/// shows in it (never a silent gap); at worst a deletion just after the page read is reported
/// too.
async fn read_page(
    store: &Store,
    gap: &Gap,
) -> Result<(crate::store::EventsPage, Option<u64>), troupe_actors::session::StoreError> {
    let page = store
        .events_after_pos(gap.after_pos, &gap.filter, GAP_PAGE)
        .await?;
    let oldest = store.oldest_event_pos().await?;
    Ok((page, oldest))
}

impl Gap {
    /// How many arrival positions after `after_pos` retention deleted before `page` (read after
    /// `after_pos`) was read, given the log's oldest position read after it (`None`: the log is
    /// empty): the positions from `after_pos + 1` up to the first of the page's events, the
    /// log's oldest and the ring's oldest. Counted like the bus's own markers: events of any
    /// kind, so at most that many of those the filter wants. 0 when nothing was lost.
    fn lost(&self, page: &crate::store::EventsPage, oldest: Option<u64>) -> u64 {
        let mut kept_from = self.until_pos;
        if let Some(first) = page.events.first() {
            kept_from = kept_from.min(first.pos);
        }
        if let Some(oldest) = oldest {
            kept_from = kept_from.min(oldest);
        }
        kept_from.saturating_sub(self.after_pos + 1)
    }

    /// Keeps the page's events that come before the ring; the gap ends at the first that does
    /// not.
    fn take(&mut self, events: Vec<troupe_actors::event::BusItem>) {
        for item in events {
            if item.pos >= self.until_pos {
                self.more = false;
                return;
            }
            self.buffer.push_back(item.event);
        }
        if self.after_pos + 1 >= self.until_pos {
            self.more = false;
        }
    }
}

#[cfg(test)]
mod tests;
