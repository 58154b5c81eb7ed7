//! Simple Text Output and Input on the serial console. Output is UTF-8 on the wire (box-drawing
//! and other non-ASCII characters as loaders draw them); input decodes the VT100 escape
//! sequences a terminal sends for arrows and function keys.

use r_efi::efi::{Boolean, Char16, Event, Status};
use r_efi::protocols::{simple_text_input as sti, simple_text_output as sto};

use crate::racy::Racy;
use crate::serial;

/// One received byte kept back when a key check peeked at the UART.
static PENDING: Racy<Option<u8>> = Racy::new(None);

const COLUMNS: usize = 80;
const ROWS: usize = 25;

/// Whether a key is waiting.
pub fn key_waiting() -> bool {
    if PENDING.get().is_some() {
        return true;
    }
    match serial::read_byte() {
        Some(b) => {
            PENDING.set(Some(b));
            true
        }
        None => false,
    }
}

fn next_byte() -> Option<u8> {
    match PENDING.get() {
        Some(b) => {
            PENDING.set(None);
            Some(b)
        }
        None => serial::read_byte(),
    }
}

fn next_byte_soon() -> Option<u8> {
    // Bytes of one escape sequence arrive together; wait a little for the rest.
    let end = crate::timer::now_us() + 2_000;
    loop {
        if let Some(b) = next_byte() {
            return Some(b);
        }
        if crate::timer::now_us() > end {
            return None;
        }
    }
}

extern "efiapi" fn out_reset(_this: *mut sto::Protocol, _ext: Boolean) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn output_string(this: *mut sto::Protocol, s: *mut Char16) -> Status {
    // SAFETY: loaders pass a NUL-terminated UCS-2 string.
    let Some(text) = (unsafe { super::util::read_ucs2(s) }) else {
        return Status::INVALID_PARAMETER;
    };
    let mut buf = [0u8; 4];
    for c in char::decode_utf16(text.iter().copied()) {
        let c = c.unwrap_or('?');
        serial::write_bytes(c.encode_utf8(&mut buf).as_bytes());
        // SAFETY: `this` is our protocol, whose mode we own.
        let mode = unsafe { &mut *(*this).mode };
        match c {
            '\r' => mode.cursor_column = 0,
            '\n' => mode.cursor_row = (mode.cursor_row + 1).min(ROWS as i32 - 1),
            '\u{8}' => mode.cursor_column = (mode.cursor_column - 1).max(0),
            _ => mode.cursor_column = (mode.cursor_column + 1).min(COLUMNS as i32 - 1),
        }
    }
    Status::SUCCESS
}

extern "efiapi" fn test_string(_this: *mut sto::Protocol, _s: *mut Char16) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn query_mode(
    _this: *mut sto::Protocol,
    mode: usize,
    cols: *mut usize,
    rows: *mut usize,
) -> Status {
    if mode != 0 {
        return Status::UNSUPPORTED;
    }
    // SAFETY: loader's out-pointers.
    unsafe {
        super::util::put(cols, COLUMNS);
        super::util::put(rows, ROWS);
    }
    Status::SUCCESS
}

extern "efiapi" fn set_mode(_this: *mut sto::Protocol, mode: usize) -> Status {
    if mode == 0 {
        Status::SUCCESS
    } else {
        Status::UNSUPPORTED
    }
}

extern "efiapi" fn set_attribute(this: *mut sto::Protocol, attr: usize) -> Status {
    // SAFETY: our protocol and mode.
    unsafe { (*(*this).mode).attribute = attr as i32 };
    Status::SUCCESS
}

extern "efiapi" fn clear_screen(this: *mut sto::Protocol) -> Status {
    // A serial log is more useful than a cleared terminal: just start a new line.
    serial::write_bytes(b"\n");
    // SAFETY: our protocol and mode.
    unsafe {
        (*(*this).mode).cursor_column = 0;
        (*(*this).mode).cursor_row = 0;
    }
    Status::SUCCESS
}

extern "efiapi" fn set_cursor_position(this: *mut sto::Protocol, col: usize, row: usize) -> Status {
    if col >= COLUMNS || row >= ROWS {
        return Status::UNSUPPORTED;
    }
    // SAFETY: our protocol and mode.
    unsafe {
        (*(*this).mode).cursor_column = col as i32;
        (*(*this).mode).cursor_row = row as i32;
    }
    Status::SUCCESS
}

extern "efiapi" fn enable_cursor(this: *mut sto::Protocol, visible: Boolean) -> Status {
    // SAFETY: our protocol and mode.
    unsafe { (*(*this).mode).cursor_visible = visible };
    Status::SUCCESS
}

extern "efiapi" fn in_reset(_this: *mut sti::Protocol, _ext: Boolean) -> Status {
    while next_byte().is_some() {}
    Status::SUCCESS
}

const SCAN_UP: u16 = 0x01;
const SCAN_DOWN: u16 = 0x02;
const SCAN_RIGHT: u16 = 0x03;
const SCAN_LEFT: u16 = 0x04;
const SCAN_HOME: u16 = 0x05;
const SCAN_END: u16 = 0x06;
const SCAN_ESC: u16 = 0x17;

extern "efiapi" fn read_key_stroke(_this: *mut sti::Protocol, key: *mut sti::InputKey) -> Status {
    let Some(b) = next_byte() else {
        return Status::NOT_READY;
    };
    let (scan, ch) = match b {
        0x1b => match next_byte_soon() {
            Some(b'[') => match next_byte_soon() {
                Some(b'A') => (SCAN_UP, 0),
                Some(b'B') => (SCAN_DOWN, 0),
                Some(b'C') => (SCAN_RIGHT, 0),
                Some(b'D') => (SCAN_LEFT, 0),
                Some(b'H') => (SCAN_HOME, 0),
                Some(b'F') => (SCAN_END, 0),
                _ => (SCAN_ESC, 0),
            },
            Some(other) => {
                PENDING.set(Some(other));
                (SCAN_ESC, 0)
            }
            None => (SCAN_ESC, 0),
        },
        b'\n' => (0, u16::from(b'\r')),
        0x7f => (0, 0x08),
        b => (0, u16::from(b)),
    };
    // SAFETY: loader's out-pointer.
    if !unsafe {
        super::util::put(
            key,
            sti::InputKey {
                scan_code: scan,
                unicode_char: ch,
            },
        )
    } {
        return Status::INVALID_PARAMETER;
    }
    Status::SUCCESS
}

/// The console protocols, built once.
pub struct Console {
    /// Text output.
    pub out: *mut sto::Protocol,
    /// Text input.
    pub input: *mut sti::Protocol,
}

/// Builds the protocols; `wait_for_key` is ConIn's key event.
pub fn build(wait_for_key: Event) -> Console {
    let mode = super::util::leak(sto::Mode {
        max_mode: 1,
        mode: 0,
        attribute: 0x07,
        cursor_column: 0,
        cursor_row: 0,
        cursor_visible: Boolean::FALSE,
    });
    let out = super::util::leak(sto::Protocol {
        reset: out_reset,
        output_string,
        test_string,
        query_mode,
        set_mode,
        set_attribute,
        clear_screen,
        set_cursor_position,
        enable_cursor,
        mode,
    });
    let input = super::util::leak(sti::Protocol {
        reset: in_reset,
        read_key_stroke,
        wait_for_key,
    });
    Console { out, input }
}
