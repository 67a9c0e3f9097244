//! TensorBoard event files: a run's scalars and pictures, for `tensorboard --logdir runs`.
//!
//! The format is TensorFlow's record file of `Event` protocol buffers
//! (tensorflow/core/util/event.proto, summary.proto): each record is
//! `length: u64 LE | masked CRC32C of length | data | masked CRC32C of data`. Only the messages
//! and fields selfsup writes are declared here (prost derives their encoding); scalars are
//! `simple_value`s and pictures PNG-encoded `Image`s, which TensorBoard's scalar and image
//! dashboards read.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use prost::Message;

/// `tensorflow.Event`: one entry of an event file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5, 6")]
    pub what: Option<What>,
}

/// What an [`Event`] carries.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first event of a file: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "6")]
    SessionLog(SessionLog),
}

/// `tensorflow.SessionLog`: a session's start, stop or checkpoint.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    #[prost(enumeration = "SessionStatus", tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `tensorflow.SessionLog.SessionStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SessionStatus {
    StatusUnspecified = 0,
    /// A (re)start: TensorBoard drops the events of earlier files at this step or later.
    Start = 1,
    Stop = 2,
    Checkpoint = 3,
}

/// `tensorflow.Summary`: tagged values of one step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "Kind", tags = "2, 4")]
    pub kind: Option<Kind>,
}

/// A scalar or a picture.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `tensorflow.Summary.Image`: an encoded picture (PNG here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// The CRC of TensorFlow's records: CRC32C, rotated and offset ("masked").
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a new `events.out.tfevents.<time>.<host>.<pid>.<n>.selfsup` file in a
/// folder, one a session, as TensorFlow's writers do. Clones write into the same file (a
/// session's metrics and its pictures: TensorBoard's reader follows one file at a time).
#[derive(Clone)]
pub struct EventWriter {
    file: Arc<Mutex<BufWriter<File>>>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, named to sort after the folder's earlier ones: TensorBoard
    /// reads a folder's event files in name order, and a session's start (see
    /// [`start_session`](Self::start_session)) only drops what it has read before.
    pub fn create(dir: &Path) -> Result<Self> {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "localhost".into()
        } else {
            host
        };
        let time = now();
        // Unique per writer, should two runs of one process start in the same second.
        static WRITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "{PREFIX}{}.{host}.{}.{n}.selfsup",
            name_time(dir, time as u64),
            std::process::id()
        ));
        let file =
            File::create_new(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let writer = EventWriter {
            file: Arc::new(Mutex::new(BufWriter::new(file))),
            path,
        };
        writer.write(&Event {
            wall_time: time,
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(writer)
    }

    /// Marks where this session logs from, as TensorFlow's writers do on a restart: TensorBoard
    /// drops what it read before this event (the folder's earlier event files) at `step` or
    /// later, the steps that a run killed past its checkpoint logs again once resumed.
    pub fn start_session(&self, step: usize) -> Result<()> {
        let start = SessionLog {
            status: SessionStatus::Start as i32,
            ..SessionLog::default()
        };
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::SessionLog(start)),
        })
    }

    /// Scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&self, step: usize, values: &[(String, f32)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| Value {
                tag: tag.clone(),
                kind: Some(Kind::SimpleValue(*v)),
            })
            .collect();
        self.summary(step, value)
    }

    /// A picture at `step`, stored as PNG.
    pub fn image(&self, step: usize, tag: &str, picture: &RgbImage) -> Result<()> {
        let mut png = Vec::new();
        picture
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .context("encoding a picture as PNG")?;
        let image = Image {
            height: picture.height() as i32,
            width: picture.width() as i32,
            colorspace: 3,
            encoded_image_string: png,
        };
        self.summary(
            step,
            vec![Value {
                tag: tag.into(),
                kind: Some(Kind::Image(image)),
            }],
        )
    }

    fn summary(&self, step: usize, value: Vec<Value>) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// One record, flushed: a run killed later keeps every event written so far.
    fn write(&self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.write_all(&len)?;
        file.write_all(&masked_crc(&len).to_le_bytes())?;
        file.write_all(&data)?;
        file.write_all(&masked_crc(&data).to_le_bytes())?;
        file.flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// How every event file's name starts.
const PREFIX: &str = "events.out.tfevents.";

/// The time in a new event file's name in `dir`: `now`, or one past the latest in the names of
/// the folder's event files when that is later (a session started in the same second, or by a
/// clock ahead of this one), so that the new file sorts last.
fn name_time(dir: &Path, now: u64) -> u64 {
    let names = std::fs::read_dir(dir).into_iter().flatten().flatten();
    let times = names.filter_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        name.strip_prefix(PREFIX)?
            .split('.')
            .next()?
            .parse::<u64>()
            .ok()
    });
    times
        .max()
        .map_or(now, |latest| now.max(latest.saturating_add(1)))
}

/// Every event of an event file, its framing and both CRCs of each record checked.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0;
    let broken = |at: usize, what: &str| anyhow::anyhow!("{}: {what} at byte {at}", path.display());
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| broken(at, "truncated record header"))?;
        let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        if masked_crc(&header[..8]) != u32::from_le_bytes(header[8..].try_into().expect("4 bytes"))
        {
            bail!(broken(at, "bad length CRC"));
        }
        let data = bytes
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| broken(at, "truncated record"))?;
        let crc = bytes
            .get(at + 12 + len..at + 16 + len)
            .ok_or_else(|| broken(at, "truncated record CRC"))?;
        if masked_crc(data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            bail!(broken(at, "bad data CRC"));
        }
        events.push(Event::decode(data).map_err(|e| broken(at, &format!("not an Event ({e})")))?);
        at += 16 + len;
    }
    Ok(events)
}
