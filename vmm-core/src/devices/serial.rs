//! The COM1 console: vm-superio's 16550 UART plus the glue to the core.
//!
//! - Output bytes go to a [`Write`] (the console socket to the launcher). A failing output never
//!   stops the guest: the error is logged once per run of failures and the byte is lost.
//! - The interrupt is an [`EventFd`] the core registers as a KVM irqfd on GSI 4.
//! - Input comes from a thread ([`spawn_input_thread`]) that reads the console socket and
//!   enqueues bytes into the receive FIFO. When the FIFO is full it waits until the guest reads
//!   from it: input is never dropped, and a guest that does not read simply stalls the sender.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Offset of the modem control register; bit 4 is loopback mode.
const MCR_OFFSET: u64 = 4;
const MCR_LOOP_BIT: u8 = 0x10;
/// Number of UART registers (the bus range length).
const REGISTERS: u64 = 8;

/// An [`EventFd`] as a vm-superio interrupt line: triggering writes 1 to it, which KVM's irqfd
/// turns into an edge on the GSI it is registered for.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes the input thread when the guest drains the receive FIFO or leaves loopback mode.
#[derive(Debug, Default)]
struct InputWaker {
    cond: Condvar,
}

impl SerialEvents for InputWaker {
    fn buffer_read(&self) {
        self.cond.notify_all();
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.cond.notify_all();
    }
}

/// The COM1 UART as a port-I/O bus device (insert it at `ports::COM1`, `ports::COM1_LEN`).
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<EventFdTrigger, Arc<InputWaker>, W>,
    waker: Arc<InputWaker>,
    /// Mirrors the UART's loopback bit: enqueueing input is a no-op while it is set.
    loopback: bool,
    /// Set after an output or interrupt error was logged, cleared by the next success.
    output_failing: bool,
    irq_failing: bool,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART that writes its output to `out` and signals its interrupt on `irq`.
    pub fn new(irq: EventFd, out: W) -> Self {
        let waker = Arc::new(InputWaker::default());
        Self {
            uart: Serial::with_events(EventFdTrigger::new(irq), Arc::clone(&waker), out),
            waker,
            loopback: false,
            output_failing: false,
            irq_failing: false,
        }
    }

    /// Free space in the receive FIFO.
    #[cfg(test)]
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Whether input can be enqueued now.
    fn accepts_input(&self) -> bool {
        !self.loopback && self.uart.fifo_capacity() > 0
    }

    /// Enqueues as much of `input` as fits; returns how many bytes were taken.
    fn enqueue(&mut self, input: &[u8]) -> usize {
        let fits = input.len().min(self.uart.fifo_capacity());
        if self.loopback {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            // The bytes are in the FIFO; only the interrupt failed.
            Err(SerialError::Trigger(e)) => {
                self.irq_error(&e);
                fits
            }
            Err(SerialError::IOError(e)) => {
                tracing::warn!(error = %e, "serial input error");
                0
            }
        }
    }

    fn irq_error(&mut self, e: &io::Error) {
        if !self.irq_failing {
            self.irq_failing = true;
            tracing::warn!(error = %e, "cannot signal the serial interrupt");
        }
    }
}

impl<W: Write + Send> BusDevice for SerialConsole<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let reg = offset + u64::try_from(i).unwrap_or(u64::MAX);
            *b = match u8::try_from(reg) {
                Ok(reg) if u64::from(reg) < REGISTERS => self.uart.read(reg),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let reg = offset + u64::try_from(i).unwrap_or(u64::MAX);
            let Ok(reg8) = u8::try_from(reg) else {
                continue;
            };
            if reg >= REGISTERS {
                continue;
            }
            match self.uart.write(reg8, value) {
                Ok(()) => {
                    self.output_failing = false;
                }
                Err(SerialError::IOError(e)) => {
                    if !self.output_failing {
                        self.output_failing = true;
                        tracing::warn!(error = %e, "serial console output failed; dropping output until it recovers");
                    }
                }
                Err(SerialError::Trigger(e)) => self.irq_error(&e),
                Err(SerialError::FullFifo) => {}
            }
            if reg == MCR_OFFSET {
                let loopback = value & MCR_LOOP_BIT != 0;
                if loopback != self.loopback {
                    self.loopback = loopback;
                    self.waker.cond.notify_all();
                }
            }
        }
    }
}

/// Starts a thread named `serial-input` that copies bytes from `input` into the UART's receive
/// FIFO, waiting for the guest to drain the FIFO whenever it is full. The thread ends at EOF
/// or on a read error other than `Interrupted`.
pub fn spawn_input_thread<R, W>(
    console: Arc<Mutex<SerialConsole<W>>>,
    mut input: R,
) -> io::Result<JoinHandle<()>>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => {
                        tracing::debug!("serial input reached EOF");
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "serial input read failed; input stops");
                        break;
                    }
                };
                deliver(&console, &buf[..n]);
            }
        })
}

/// Enqueues all of `bytes`, blocking while the FIFO is full or the UART is in loopback mode.
fn deliver<W: Write + Send>(console: &Mutex<SerialConsole<W>>, mut bytes: &[u8]) {
    let mut guard = lock(console);
    while !bytes.is_empty() {
        if !guard.accepts_input() {
            let waker = Arc::clone(&guard.waker);
            guard = waker
                .cond
                .wait_while(guard, |c| !c.accepts_input())
                .expect("serial lock poisoned");
        }
        let n = guard.enqueue(bytes);
        bytes = &bytes[n..];
    }
}

fn lock<W: Write + Send>(console: &Mutex<SerialConsole<W>>) -> MutexGuard<'_, SerialConsole<W>> {
    console.lock().expect("serial lock poisoned")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;
    /// vm-superio's FIFO size.
    const FIFO: usize = 64;

    #[derive(Clone, Default)]
    struct SharedOut(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A reader that hands out a fixed byte sequence in chunks, then EOF, and reports through
    /// a channel when it was asked for more after the last byte (i.e. everything was enqueued).
    struct FakeReader {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        done: mpsc::Sender<()>,
    }
    impl Read for FakeReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.chunk.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            if n == 0 {
                let _ = self.done.send(());
            }
            Ok(n)
        }
    }

    fn reg_read<W: Write + Send>(c: &Mutex<SerialConsole<W>>, reg: u64) -> u8 {
        let mut b = [0u8];
        c.lock().unwrap().read(reg, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_writer_and_raises_thre_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedOut::default();
        let mut c = SerialConsole::new(irq.try_clone().unwrap(), out.clone());
        c.write(IER, &[0x02]); // THR empty interrupt on
        assert_eq!(
            irq.read().unwrap(),
            1,
            "enabling THRE interrupts fires at once"
        );
        let mut iir = [0u8];
        c.read(IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "THR empty pending");
        c.write(DATA, b"h");
        assert_eq!(
            irq.read().unwrap(),
            1,
            "a transmitted byte raises THRE again"
        );
        c.write(DATA, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn broken_output_does_not_panic_and_keeps_the_uart_working() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let c = Mutex::new(SerialConsole::new(irq, Broken));
        for _ in 0..3 {
            c.lock().unwrap().write(DATA, b"x");
        }
        assert!(c.lock().unwrap().output_failing);
        assert_eq!(
            reg_read(&c, LSR) & 0x60,
            0x60,
            "transmitter still reads empty"
        );
    }

    #[test]
    fn input_waits_for_the_guest_to_drain_the_fifo_and_loses_nothing() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let c = Arc::new(Mutex::new(SerialConsole::new(
            irq.try_clone().unwrap(),
            io::sink(),
        )));
        c.lock().unwrap().write(IER, &[0x01]); // RX data interrupt on
        let data: Vec<u8> = (0..(3 * FIFO + 17))
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let (done_tx, done_rx) = mpsc::channel();
        let reader = FakeReader {
            data: data.clone(),
            pos: 0,
            chunk: 50,
            done: done_tx,
        };
        let handle = spawn_input_thread(Arc::clone(&c), reader).unwrap();

        // The FIFO fills up and the thread must block rather than drop or spin out.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while c.lock().unwrap().fifo_capacity() > 0 {
            assert!(std::time::Instant::now() < deadline, "FIFO never filled");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            done_rx.try_recv().is_err(),
            "reader reached EOF although the FIFO could not take all the data"
        );
        assert_eq!(irq.read().unwrap(), 1, "RX interrupt raised");

        // Play the guest driver: read while data is ready until everything arrived.
        let mut got = Vec::new();
        while got.len() < data.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "input stalled at {}",
                got.len()
            );
            if reg_read(&c, LSR) & LSR_DATA_READY != 0 {
                got.push(reg_read(&c, DATA));
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(got, data);
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        handle.join().unwrap();
        assert_eq!(
            reg_read(&c, LSR) & LSR_DATA_READY,
            0,
            "nothing extra was enqueued"
        );
    }

    #[test]
    fn input_thread_ends_at_eof() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let c = Arc::new(Mutex::new(SerialConsole::new(irq, io::sink())));
        let handle = spawn_input_thread(Arc::clone(&c), io::Cursor::new(b"ab".to_vec())).unwrap();
        handle.join().unwrap();
        assert_eq!(reg_read(&c, DATA), b'a');
        assert_eq!(reg_read(&c, DATA), b'b');
        assert_eq!(reg_read(&c, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn loopback_mode_holds_input_until_it_ends() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let c = Arc::new(Mutex::new(SerialConsole::new(irq, io::sink())));
        c.lock().unwrap().write(MCR_OFFSET, &[MCR_LOOP_BIT]);
        let handle = spawn_input_thread(Arc::clone(&c), io::Cursor::new(b"z".to_vec())).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !handle.is_finished(),
            "input must wait while the UART loops back"
        );
        assert_eq!(reg_read(&c, LSR) & LSR_DATA_READY, 0);
        c.lock().unwrap().write(MCR_OFFSET, &[0x08]);
        handle.join().unwrap();
        assert_eq!(reg_read(&c, DATA), b'z');
    }
}
