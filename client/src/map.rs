//! Opening and mapping a region file, validated before it is touched.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::{Mmap, MmapMut, MmapOptions};
use sluice_shm_layout::layout::{self, Region, HEADER_SIZE};

/// The default region path on a developer's machine.
pub const DEFAULT_REGION: &str = "/dev/shm/sluice";

/// The environment variable that overrides the region path.
pub const REGION_ENV: &str = "SLUICE_REGION";

/// The region path to use: `explicit`, else `$SLUICE_REGION`, else
/// [`DEFAULT_REGION`].
pub fn region_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(REGION_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_REGION),
    }
}

/// Why a region could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No file at the path.
    #[error("region {path} does not exist: start sluiced, or point --region / SLUICE_REGION at the region it serves")]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// Not allowed to open it.
    #[error("permission denied opening region {path} for {access}: run as a member of its group (see ls -l {path})")]
    PermissionDenied {
        /// The path tried.
        path: PathBuf,
        /// "reading" or "reading and writing".
        access: &'static str,
    },
    /// The header or size is wrong.
    #[error("region {path}: {source}; {hint}")]
    Layout {
        /// The path tried.
        path: PathBuf,
        /// What was wrong.
        source: layout::AttachError,
        /// What to do about it.
        hint: &'static str,
    },
    /// Any other I/O error.
    #[error("region {path}: {op}: {source}")]
    Io {
        /// The path tried.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn hint_for(e: &layout::AttachError) -> &'static str {
    match e {
        layout::AttachError::VersionMismatch { .. } | layout::AttachError::RecordSize { .. } => {
            "run a sluice build of the same layout version as the daemon, or restart sluiced from this build once no client uses the region"
        }
        layout::AttachError::NotPublished => "wait for sluiced to finish starting; if none is running, restart it",
        _ => "stop its clients, remove the file and restart sluiced",
    }
}

enum Mapping {
    Ro(#[allow(dead_code)] Mmap),
    Rw(#[allow(dead_code)] MmapMut),
}

/// A mapped, validated region. Keeps the mapping alive as long as the view.
pub struct RegionMap {
    // Field order matters only for clarity: `region` holds a raw pointer into
    // `_mapping`, and both drop together.
    region: Region,
    _mapping: Mapping,
    file: File,
    path: PathBuf,
}

impl RegionMap {
    /// Open and map the region at `path`, read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> Result<Self, OpenError> {
        let access = if writable {
            "reading and writing"
        } else {
            "reading"
        };
        // O_NONBLOCK: a FIFO (or other special file) at the path must not
        // block the open; it is refused below as not a regular file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_error(path, access, e))?;
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, op, source }
        };
        let meta = file.metadata().map_err(io("stat"))?;
        if !meta.file_type().is_file() {
            return Err(OpenError::Io {
                path: path.to_path_buf(),
                op: "open",
                source: io::Error::other(
                    "not a regular file: point --region / SLUICE_REGION at the region sluiced created",
                ),
            });
        }
        let len = meta.len();
        let layout_err = |source: layout::AttachError| OpenError::Layout {
            path: path.to_path_buf(),
            hint: hint_for(&source),
            source,
        };
        let mut head = [0u8; HEADER_SIZE];
        if len >= HEADER_SIZE as u64 {
            file.read_exact_at(&mut head, 0)
                .map_err(io("read header"))?;
        }
        layout::check_header_bytes(&head, len).map_err(layout_err)?;
        let size = usize::try_from(len).map_err(|_| {
            layout_err(layout::AttachError::Corrupt(format!(
                "size {len} does not fit memory"
            )))
        })?;
        let mut opts = MmapOptions::new();
        opts.len(size);
        let (mapping, base) = if writable {
            // SAFETY: mapping a file shared with other processes: every access
            // to it goes through atomics (see sluice_shm_layout::layout), and
            // its length was checked against the header just above.
            let mut m = unsafe { opts.map_mut(&file) }.map_err(io("map"))?;
            let base = NonNull::new(m.as_mut_ptr());
            (Mapping::Rw(m), base)
        } else {
            // SAFETY: as above, read-only.
            let m = unsafe { opts.map(&file) }.map_err(io("map"))?;
            let base = NonNull::new(m.as_ptr() as *mut u8);
            (Mapping::Ro(m), base)
        };
        let base = base.ok_or_else(|| OpenError::Io {
            path: path.to_path_buf(),
            op: "map",
            source: io::Error::other("null mapping"),
        })?;
        // SAFETY: `base` is a page-aligned mapping of `size` bytes owned by
        // `mapping`, which lives in the returned value beside the view.
        let region = unsafe { Region::attach(base, size) }.map_err(layout_err)?;
        Ok(Self {
            region,
            _mapping: mapping,
            file,
            path: path.to_path_buf(),
        })
    }

    /// Map a region file whose header is not (yet) published: the daemon's
    /// own re-creation of a vanished region. The caller publishes it.
    pub fn open_unpublished(path: &Path, file: &File) -> Result<Self, OpenError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { path, op, source }
        };
        let len = file.metadata().map_err(io("stat"))?.len();
        let size = usize::try_from(len).map_err(|_| OpenError::Io {
            path: path.to_path_buf(),
            op: "map",
            source: io::Error::other("region too large"),
        })?;
        // SAFETY: a shared mapping of a file of `size` bytes that the caller
        // holds locked; every access to it goes through atomics.
        let mut m = unsafe { MmapOptions::new().len(size).map_mut(file) }.map_err(io("map"))?;
        let base = NonNull::new(m.as_mut_ptr()).ok_or_else(|| OpenError::Io {
            path: path.to_path_buf(),
            op: "map",
            source: io::Error::other("null mapping"),
        })?;
        // The version is the one thing unpublished: check everything else
        // by the usual rules on a copy of the header with it filled in.
        let mut head = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut head, 0)
            .map_err(io("read header"))?;
        head[8..12].copy_from_slice(&layout::LAYOUT_VERSION.to_le_bytes());
        let geo = layout::check_header_bytes(&head, len).map_err(|source| OpenError::Layout {
            path: path.to_path_buf(),
            hint: hint_for(&source),
            source,
        })?;
        // SAFETY: `base` is a page-aligned mapping of `size` bytes owned by
        // `m`, kept alive in the returned value; its geometry was checked.
        let region = unsafe { Region::from_checked(base, geo) };
        let dup = file.try_clone().map_err(io("dup"))?;
        Ok(Self {
            region,
            _mapping: Mapping::Rw(m),
            file: dup,
            path: path.to_path_buf(),
        })
    }

    /// Wrap a mapping the daemon has just created and initialised.
    pub fn from_parts(region: Region, map: MmapMut, file: File, path: PathBuf) -> Self {
        Self {
            region,
            _mapping: Mapping::Rw(map),
            file,
            path,
        }
    }

    /// The typed view.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The open file (for locks and stat).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_error(path: &Path, access: &'static str, e: io::Error) -> OpenError {
    match e.kind() {
        io::ErrorKind::NotFound => OpenError::Missing {
            path: path.to_path_buf(),
        },
        io::ErrorKind::PermissionDenied => OpenError::PermissionDenied {
            path: path.to_path_buf(),
            access,
        },
        _ => OpenError::Io {
            path: path.to_path_buf(),
            op: "open",
            source: e,
        },
    }
}

/// The datagram socket an attaching client pokes so the daemon watches it
/// at once: the region path with `.wake` added.
pub fn wake_socket(region: &Path) -> PathBuf {
    let mut s = region.as_os_str().to_os_string();
    s.push(".wake");
    PathBuf::from(s)
}
