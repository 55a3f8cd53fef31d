//! A reader for the kernel's own type information (BTF), enough to find the
//! byte offset of a struct member and the arguments of a raw tracepoint.
//!
//! Rust eBPF programs get no CO-RE relocations, so the loader resolves the
//! few offsets the programs need from /sys/kernel/btf/vmlinux at start-up.
//! The format is documented in the kernel's Documentation/bpf/btf.rst; only
//! the type and string sections are read.

use std::{fs, path::Path};

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

/// BTF kinds (the `kind` bits of `btf_type::info`).
mod kind {
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;
}

/// Errors reading BTF or finding something in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "failed to read kernel type information {path}: {source} \
         (the kernel must be built with CONFIG_DEBUG_INFO_BTF=y)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

/// One parsed `btf_type` record.
#[derive(Clone, Copy, Debug)]
struct Type {
    name_off: u32,
    kind: u8,
    vlen: u16,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Byte offset of the kind-specific data that follows the record.
    data: usize,
}

/// A struct or union member, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Offset from the start of the outermost struct, in bytes.
    pub offset: u32,
    /// Type id of the member, with typedefs and qualifiers stripped.
    pub type_id: u32,
}

/// A parsed BTF blob.
pub struct Btf {
    data: Vec<u8>,
    /// Index = type id (id 0 is `void` and has a placeholder).
    types: Vec<Type>,
    strings: std::ops::Range<usize>,
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    /// Reads BTF from a file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    /// Parses a raw (non-ELF) little- or native-endian BTF blob.
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Malformed(what.to_owned());
        if data.len() < 24 {
            return Err(bad("shorter than its header"));
        }
        let magic = u16::from_ne_bytes([data[0], data[1]]);
        if magic != MAGIC {
            return Err(bad("bad magic (not BTF, or of another byte order)"));
        }
        let word = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| bad("truncated"))
        };
        let hdr_len = word(4)? as usize;
        let (type_off, type_len) = (word(8)? as usize, word(12)? as usize);
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types_end > data.len() || strings.end > data.len() {
            return Err(bad("section past the end of the data"));
        }

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            vlen: 0,
            kind_flag: false,
            size_or_type: 0,
            data: 0,
        }];
        let mut at = types_start;
        while at < types_end {
            let info = word(at + 4)?;
            let ty = Type {
                name_off: word(at)?,
                kind: ((info >> 24) & 0x1f) as u8,
                vlen: (info & 0xffff) as u16,
                kind_flag: info >> 31 == 1,
                size_or_type: word(at + 8)?,
                data: at + 12,
            };
            let vlen = usize::from(ty.vlen);
            let extra = match ty.kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => 0,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::ENUM64 | kind::DATASEC => 12 * vlen,
                kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
                other => return Err(BtfError::Malformed(format!("unknown kind {other}"))),
            };
            at = ty.data + extra;
            types.push(ty);
        }
        if at != types_end {
            return Err(bad("type section does not end on a record"));
        }
        Ok(Self {
            data,
            types,
            strings,
        })
    }

    fn word(&self, at: usize) -> u32 {
        let b = &self.data[at..at + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn name(&self, name_off: u32) -> &[u8] {
        let start = self.strings.start + name_off as usize;
        if start >= self.strings.end {
            return b"";
        }
        let rest = &self.data[start..self.strings.end];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| BtfError::Malformed(format!("type id {id} out of range")))
    }

    /// The id of the named type of the given kind.
    fn find(&self, name: &str, want: u8) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == want && self.name(t.name_off) == name.as_bytes())
            .map(|i| i as u32)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Malformed(format!(
            "type chain from {id} too long"
        )))
    }

    /// Size in bytes of a (resolved) type, for the kinds that have one.
    pub fn size_of(&self, id: u32) -> Result<u32, BtfError> {
        let id = self.resolve(id)?;
        let ty = self.ty(id)?;
        match ty.kind {
            kind::INT | kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FLOAT => {
                Ok(ty.size_or_type)
            }
            kind::PTR => Ok(8),
            kind::ARRAY => {
                let elem = self.word(ty.data);
                let nelems = self.word(ty.data + 8);
                Ok(self.size_of(elem)? * nelems)
            }
            other => Err(BtfError::Malformed(format!(
                "type {id} of kind {other} has no size"
            ))),
        }
    }

    /// Finds `member` in `struct_name`, looking through anonymous nested
    /// structs and unions (as in `mm_struct`), and returns its byte offset.
    pub fn member(&self, struct_name: &str, member: &str) -> Result<Member, BtfError> {
        let id = self
            .find(struct_name, kind::STRUCT)
            .ok_or_else(|| BtfError::Missing(format!("struct {struct_name}")))?;
        self.member_in(id, member, 0)?
            .ok_or_else(|| BtfError::Missing(format!("member {struct_name}.{member}")))
    }

    fn member_in(&self, id: u32, member: &str, base: u32) -> Result<Option<Member>, BtfError> {
        let ty = *self.ty(id)?;
        if ty.kind != kind::STRUCT && ty.kind != kind::UNION {
            return Ok(None);
        }
        for i in 0..usize::from(ty.vlen) {
            let at = ty.data + 12 * i;
            let name = self.name(self.word(at));
            let member_type = self.word(at + 4);
            let raw_offset = self.word(at + 8);
            // With kind_flag the low 24 bits are the bit offset and the top
            // 8 the bitfield size; without it, the whole word is the offset.
            let (bit_offset, bitfield) = if ty.kind_flag {
                (raw_offset & 0x00ff_ffff, raw_offset >> 24)
            } else {
                (raw_offset, 0)
            };
            if name.is_empty() {
                let inner = self.resolve(member_type)?;
                if bit_offset % 8 == 0
                    && let Some(found) = self.member_in(inner, member, base + bit_offset / 8)?
                {
                    return Ok(Some(found));
                }
            } else if name == member.as_bytes() {
                if bitfield != 0 || bit_offset % 8 != 0 {
                    return Err(BtfError::Malformed(format!(
                        "member {member} is a bitfield, which the programs cannot read"
                    )));
                }
                return Ok(Some(Member {
                    offset: base + bit_offset / 8,
                    type_id: self.resolve(member_type)?,
                }));
            }
        }
        Ok(None)
    }

    /// Finds `member` in the struct or union with this type id (see
    /// [`Btf::member`]).
    pub fn member_of(&self, type_id: u32, member: &str) -> Result<Member, BtfError> {
        let id = self.resolve(type_id)?;
        self.member_in(id, member, 0)?
            .ok_or_else(|| BtfError::Missing(format!("member {member} in type {id}")))
    }

    /// The element type and length, when the type is an array.
    pub fn array(&self, type_id: u32) -> Result<Option<(u32, u32)>, BtfError> {
        let ty = self.ty(self.resolve(type_id)?)?;
        if ty.kind != kind::ARRAY {
            return Ok(None);
        }
        Ok(Some((
            self.resolve(self.word(ty.data))?,
            self.word(ty.data + 8),
        )))
    }

    /// The value of an enumerator (`MM_ANONPAGES`), from whichever enum
    /// declares it.
    pub fn enum_value(&self, name: &str) -> Option<i64> {
        for ty in &self.types {
            let (stride, wide) = match ty.kind {
                kind::ENUM => (8, false),
                kind::ENUM64 => (12, true),
                _ => continue,
            };
            for i in 0..usize::from(ty.vlen) {
                let at = ty.data + stride * i;
                if self.name(self.word(at)) != name.as_bytes() {
                    continue;
                }
                let low = self.word(at + 4);
                return Some(if wide {
                    (i64::from(self.word(at + 8)) << 32) | i64::from(low)
                } else {
                    i64::from(low as i32)
                });
            }
        }
        None
    }

    /// The number of arguments a raw tracepoint passes to BPF programs, from
    /// the prototype of its `btf_trace_<name>` typedef (whose first parameter,
    /// the tracepoint's private data, BPF programs do not see).
    pub fn raw_tracepoint_args(&self, tracepoint: &str) -> Result<usize, BtfError> {
        let name = format!("btf_trace_{tracepoint}");
        let missing = || BtfError::Missing(format!("tracepoint prototype {name}"));
        let typedef = self.find(&name, kind::TYPEDEF).ok_or_else(missing)?;
        let ptr = self.ty(typedef)?.size_or_type;
        let ptr_ty = self.ty(ptr)?;
        if ptr_ty.kind != kind::PTR {
            return Err(missing());
        }
        let proto = self.ty(ptr_ty.size_or_type)?;
        if proto.kind != kind::FUNC_PROTO || proto.vlen == 0 {
            return Err(missing());
        }
        Ok(usize::from(proto.vlen) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small BTF blob by hand: the encoder half of the format.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: vec![0],
                next_id: 1,
                ..Self::default()
            }
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn record(
            &mut self,
            name: &str,
            kind: u8,
            vlen: u16,
            flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.string(name);
            let info = (u32::from(kind) << 24) | u32::from(vlen) | (u32::from(flag) << 31);
            for w in [name_off, info, size_or_type] {
                self.types.extend_from_slice(&w.to_ne_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_ne_bytes());
            }
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.record(name, kind::INT, 0, false, size);
            self.words(&[size * 8]);
            id
        }
        fn structure(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let offs: Vec<(u32, u32, u32)> = members
                .iter()
                .map(|&(n, t, bits)| (self.string(n), t, bits))
                .collect();
            let id = self.record(name, kind::STRUCT, members.len() as u16, false, size);
            for (n, t, bits) in offs {
                self.words(&[n, t, bits]);
            }
            id
        }
        fn finish(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_ne_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Btf {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let long = b.int("long unsigned int", 8);
        let pid_t = b.record("pid_t", kind::TYPEDEF, 0, false, int);
        // struct { long hiwater; long total; } nested anonymously at byte 16.
        let inner = b.structure("", 16, &[("hiwater", long, 0), ("total", long, 64)]);
        let outer = b.structure(
            "task",
            64,
            &[("flags", int, 0), ("pid", pid_t, 32), ("", inner, 128)],
        );
        let ptr = b.record("", kind::PTR, 0, false, outer);
        // typedef void (*btf_trace_exit)(void *, struct task *, bool);
        let void_ptr = b.record("", kind::PTR, 0, false, 0);
        let proto = b.record("", kind::FUNC_PROTO, 3, false, 0);
        b.words(&[0, void_ptr, 0, ptr, 0, int]);
        let proto_ptr = b.record("", kind::PTR, 0, false, proto);
        b.record("btf_trace_exit", kind::TYPEDEF, 0, false, proto_ptr);
        // enum { MM_FILEPAGES, MM_ANONPAGES }; long counters[2];
        let (file, anon) = (b.string("MM_FILEPAGES"), b.string("MM_ANONPAGES"));
        b.record("", kind::ENUM, 2, false, 4);
        b.words(&[file, 0, anon, 1]);
        b.record("", kind::ARRAY, 0, false, 0);
        b.words(&[long, int, 2]);
        Btf::parse(b.finish()).unwrap()
    }

    #[test]
    fn finds_direct_and_nested_members() {
        let btf = sample();
        assert_eq!(btf.member("task", "flags").unwrap().offset, 0);
        let pid = btf.member("task", "pid").unwrap();
        assert_eq!(pid.offset, 4);
        assert_eq!(
            btf.size_of(pid.type_id).unwrap(),
            4,
            "typedef resolved to int"
        );
        assert_eq!(btf.member("task", "hiwater").unwrap().offset, 16);
        assert_eq!(btf.member("task", "total").unwrap().offset, 24);
    }

    #[test]
    fn reads_enums_and_arrays() {
        let btf = sample();
        assert_eq!(btf.enum_value("MM_ANONPAGES"), Some(1));
        assert_eq!(btf.enum_value("MM_FILEPAGES"), Some(0));
        assert_eq!(btf.enum_value("MM_NOPE"), None);
        let array = btf.types.len() as u32 - 1;
        let (elem, len) = btf.array(array).unwrap().unwrap();
        assert_eq!((btf.size_of(elem).unwrap(), len), (8, 2));
        assert_eq!(btf.size_of(array).unwrap(), 16);
        assert_eq!(btf.array(1).unwrap(), None);
    }

    #[test]
    fn reports_what_is_missing() {
        let btf = sample();
        let err = btf.member("task", "nope").unwrap_err().to_string();
        assert_eq!(err, "kernel BTF has no member task.nope");
        let err = btf.member("mm_struct", "pid").unwrap_err().to_string();
        assert_eq!(err, "kernel BTF has no struct mm_struct");
    }

    #[test]
    fn counts_raw_tracepoint_args() {
        let btf = sample();
        assert_eq!(btf.raw_tracepoint_args("exit").unwrap(), 2);
        assert!(btf.raw_tracepoint_args("fork").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        assert!(Btf::parse(vec![0; 64]).is_err());
        let mut data = Builder::new().finish();
        data.truncate(data.len() - 1);
        assert!(Btf::parse(data).is_err());
    }

    /// The real thing, where there is one: the members the programs read.
    #[test]
    fn reads_running_kernel() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("skipped: no {VMLINUX} on this machine");
            return;
        };
        let comm = btf.member("task_struct", "comm").unwrap();
        assert_eq!(btf.size_of(comm.type_id).unwrap(), 16);
        assert!(btf.member("mm_struct", "rss_stat").is_ok(), "nested member");
        assert_eq!(btf.enum_value("MM_FILEPAGES"), Some(0));
        assert!(btf.raw_tracepoint_args("sched_process_fork").unwrap() == 2);
    }
}
