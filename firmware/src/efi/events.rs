//! Events and timers, without interrupts: a timer is due when the TSC says so, and waiting is a
//! polling loop. Notification functions of timer events run when a wait, check or stall polls
//! them, which is as often as loaders look at time anyway.

use alloc::vec::Vec;
use core::ffi::c_void;
use r_efi::efi::{Event, EventNotify, Guid, Status};

use crate::racy::Racy;
use crate::timer;

pub const EVT_TIMER: u32 = 0x8000_0000;
pub const EVT_NOTIFY_WAIT: u32 = 0x0000_0100;
pub const EVT_NOTIFY_SIGNAL: u32 = 0x0000_0200;
pub const EVT_SIGNAL_EXIT_BOOT_SERVICES: u32 = 0x0000_0201;

/// The event group signalled at ExitBootServices (EFI_EVENT_GROUP_EXIT_BOOT_SERVICES).
pub const GROUP_EXIT_BOOT_SERVICES: Guid = Guid::from_fields(
    0x27abf055,
    0xb1b8,
    0x4c26,
    0x80,
    0x48,
    &[0x74, 0x8f, 0x37, 0xba, 0xa2, 0xdf],
);

/// What makes an event signalled besides SignalEvent and its timer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing else.
    Plain,
    /// A key waiting on the serial console (ConIn's WaitForKey).
    Key,
}

struct EventData {
    kind: u32,
    notify: Option<EventNotify>,
    context: *mut c_void,
    group: Option<Guid>,
    signaled: bool,
    /// (due time in µs, period in µs or 0).
    timer: Option<(u64, u64)>,
    source: Source,
}

static EVENTS: Racy<Vec<*mut EventData>> = Racy::new(Vec::new());

fn events() -> &'static mut Vec<*mut EventData> {
    // SAFETY: no function here keeps this borrow across a notification call.
    unsafe { EVENTS.borrow() }
}

fn data(e: Event) -> Option<&'static mut EventData> {
    let p = e as *mut EventData;
    if events().contains(&p) {
        // SAFETY: a registered, live event.
        Some(unsafe { &mut *p })
    } else {
        None
    }
}

/// Creates an event.
pub fn create(
    kind: u32,
    notify: Option<EventNotify>,
    context: *mut c_void,
    group: Option<Guid>,
    source: Source,
) -> Result<Event, Status> {
    if kind & (EVT_NOTIFY_WAIT | EVT_NOTIFY_SIGNAL) != 0 && notify.is_none() {
        return Err(Status::INVALID_PARAMETER);
    }
    let group = if kind == EVT_SIGNAL_EXIT_BOOT_SERVICES {
        Some(GROUP_EXIT_BOOT_SERVICES)
    } else {
        group
    };
    let p = crate::efi::util::leak(EventData {
        kind,
        notify,
        context,
        group,
        signaled: false,
        timer: None,
        source,
    });
    events().push(p);
    Ok(p as Event)
}

/// Closes an event.
pub fn close(e: Event) -> Status {
    let p = e as *mut EventData;
    let list = events();
    let Some(i) = list.iter().position(|x| *x == p) else {
        return Status::INVALID_PARAMETER;
    };
    list.remove(i);
    // SAFETY: unregistered just now.
    drop(unsafe { alloc::boxed::Box::from_raw(p) });
    Status::SUCCESS
}

/// SetTimer: 0 cancel, 1 periodic, 2 relative; `time` in 100 ns units.
pub fn set_timer(e: Event, kind: u32, time: u64) -> Status {
    let Some(d) = data(e) else {
        return Status::INVALID_PARAMETER;
    };
    if d.kind & EVT_TIMER == 0 {
        return Status::INVALID_PARAMETER;
    }
    let us = time / 10;
    d.timer = match kind {
        0 => None,
        1 => Some((timer::now_us() + us.max(1), us.max(1))),
        2 => Some((timer::now_us() + us, 0)),
        _ => return Status::INVALID_PARAMETER,
    };
    Status::SUCCESS
}

fn call_notify(e: Event) {
    let Some(d) = data(e) else { return };
    if let Some(f) = d.notify {
        let ctx = d.context;
        f(e, ctx);
    }
}

/// Signals `e` (and for a grouped event, every event of its group).
pub fn signal(e: Event) -> Status {
    let Some(d) = data(e) else {
        return Status::INVALID_PARAMETER;
    };
    match d.group {
        Some(g) => signal_group(&g),
        None => signal_one(e),
    }
    Status::SUCCESS
}

fn signal_one(e: Event) {
    let Some(d) = data(e) else { return };
    if d.signaled {
        return;
    }
    d.signaled = true;
    if d.kind & EVT_NOTIFY_SIGNAL != 0 {
        // Notification consumes the signal: it is what "signalled" means for such events.
        d.signaled = false;
        call_notify(e);
    }
}

/// Signals every event of `group`.
pub fn signal_group(group: &Guid) {
    let members: Vec<Event> = events()
        .iter()
        .filter(|&&p| {
            // SAFETY: registered events are live.
            unsafe { (*p).group.as_ref() == Some(group) }
        })
        .map(|&p| p as Event)
        .collect();
    for e in members {
        signal_one(e);
    }
}

/// Fires due timers. Called whenever the firmware polls time.
pub fn poll_timers() {
    let now = timer::now_us();
    let due: Vec<Event> = events()
        .iter()
        .filter_map(|&p| {
            // SAFETY: registered events are live.
            let d = unsafe { &mut *p };
            match d.timer {
                Some((at, period)) if at <= now => {
                    d.timer = (period != 0).then_some((now + period, period));
                    Some(p as Event)
                }
                _ => None,
            }
        })
        .collect();
    for e in due {
        signal_one(e);
    }
}

/// CheckEvent: NOT_READY until signalled; reading a signal clears it.
pub fn check(e: Event) -> Status {
    poll_timers();
    let Some(d) = data(e) else {
        return Status::INVALID_PARAMETER;
    };
    if d.kind & EVT_NOTIFY_SIGNAL != 0 {
        return Status::INVALID_PARAMETER;
    }
    if !d.signaled && d.source == Source::Key && crate::efi::console::key_waiting() {
        d.signaled = true;
    }
    if !d.signaled && d.kind & EVT_NOTIFY_WAIT != 0 {
        call_notify(e);
    }
    let Some(d) = data(e) else {
        return Status::INVALID_PARAMETER;
    };
    if d.signaled {
        d.signaled = false;
        Status::SUCCESS
    } else {
        Status::NOT_READY
    }
}

/// WaitForEvent over `list`: the index of the first signalled one.
pub fn wait(list: &[Event]) -> Result<usize, Status> {
    loop {
        for (i, &e) in list.iter().enumerate() {
            match check(e) {
                Status::SUCCESS => return Ok(i),
                Status::NOT_READY => {}
                s => return Err(s),
            }
        }
        crate::io::pause();
    }
}
