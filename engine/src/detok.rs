//! Incremental text for generation: turns the raw bytes of each new token into text that is
//! final, i.e. complete UTF-8 and not the start of a caller's stop string.
//!
//! Byte-level BPE tokens can end mid-character (an emoji is often 2–4 tokens), and a stop string
//! can span tokens, so both are held back until they resolve.

/// What one `push` made final.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Push {
    /// Text safe to emit now (may be empty).
    pub text: String,
    /// A stop string completed: `text` ends right before it, and generation should end.
    pub stopped: bool,
}

pub struct TextStream {
    /// Non-empty stop strings.
    stop: Vec<String>,
    /// Bytes of an incomplete UTF-8 sequence at the end of the stream (≤ 3 bytes).
    pending: Vec<u8>,
    /// Decoded text not emitted yet: a suffix that may still become a stop string.
    held: String,
    stopped: bool,
}

impl TextStream {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stop: Vec<String>) -> Self {
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stop, pending: Vec::new(), held: String::new(), stopped: false }
    }

    /// Feeds one token's bytes. After a stop, every push returns empty text and `stopped`.
    pub fn push(&mut self, bytes: &[u8]) -> Push {
        if self.stopped {
            return Push { text: String::new(), stopped: true };
        }
        self.pending.extend_from_slice(bytes);
        decode_utf8_prefix(&mut self.pending, &mut self.held);
        if let Some(at) = self.find_stop() {
            self.held.truncate(at);
            self.stopped = true;
            self.pending.clear();
            return Push { text: std::mem::take(&mut self.held), stopped: true };
        }
        let keep = self.partial_stop_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Push { text, stopped: false }
    }

    /// Flushes what is held back at the end of generation; invalid trailing bytes become U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending.clear();
        // U+FFFD could in theory complete a stop string: check once more.
        if let Some(at) = self.find_stop() {
            self.held.truncate(at);
            self.stopped = true;
        }
        std::mem::take(&mut self.held)
    }

    /// Byte offset in `held` of the earliest complete stop string.
    fn find_stop(&self) -> Option<usize> {
        self.stop.iter().filter_map(|s| self.held.find(s.as_str())).min()
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let h = &self.held;
        self.stop
            .iter()
            .filter_map(|s| {
                (1..s.len().min(h.len() + 1))
                    .rev()
                    .find(|&k| h.is_char_boundary(h.len() - k) && s.starts_with(&h[h.len() - k..]))
            })
            .max()
            .unwrap_or(0)
    }
}

/// Moves the longest decodable prefix of `bytes` into `out`, leaving an incomplete trailing
/// sequence in `bytes`. Invalid sequences in the middle become U+FFFD.
fn decode_utf8_prefix(bytes: &mut Vec<u8>, out: &mut String) {
    let mut start = 0;
    loop {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = bytes.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                // Valid by definition of `valid_up_to`, so the default is never taken.
                out.push_str(std::str::from_utf8(&bytes[start..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid + n;
                    }
                    None => {
                        start = valid; // truncated sequence: wait for more bytes
                        break;
                    }
                }
            }
        }
    }
    bytes.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes each chunk; returns everything emitted (including `finish`) and whether it stopped.
    fn run(stop: &[&str], chunks: &[&[u8]]) -> (String, bool, Vec<String>) {
        let mut ts = TextStream::new(stop.iter().map(|s| s.to_string()).collect());
        let (mut all, mut parts, mut stopped) = (String::new(), Vec::new(), false);
        for c in chunks {
            let p = ts.push(c);
            all.push_str(&p.text);
            parts.push(p.text);
            stopped |= p.stopped;
        }
        all.push_str(&ts.finish());
        (all, stopped, parts)
    }

    #[test]
    fn multibyte_char_split_across_pushes() {
        let e = "é".as_bytes(); // 2 bytes
        let (all, _, parts) = run(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(all, "café!");
        assert_eq!(parts, ["caf", "", "é", "!"]);
        let cjk = "中".as_bytes(); // 3 bytes, one per push
        let (all, _, parts) = run(&[], &[&cjk[..1], &cjk[1..2], &cjk[2..]]);
        assert_eq!((all.as_str(), parts), ("中", vec!["".to_string(), "".into(), "中".into()]));
    }

    #[test]
    fn emoji_in_four_pushes() {
        let b = "a🦀b".as_bytes();
        let chunks: Vec<&[u8]> = b.chunks(1).collect();
        let (all, stopped, parts) = run(&["zz"], &chunks);
        assert_eq!(all, "a🦀b");
        assert!(!stopped);
        assert_eq!(parts[4], "🦀");
    }

    #[test]
    fn stop_string_spanning_tokens() {
        let (all, stopped, parts) = run(&["STOP"], &[b"hello S", b"TO", b"P and more"]);
        assert!(stopped);
        assert_eq!(all, "hello ");
        assert_eq!(parts, ["hello ", "", ""]);
        // Nothing comes out after a stop.
        let mut ts = TextStream::new(vec!["x".into()]);
        assert_eq!(ts.push(b"axb"), Push { text: "a".into(), stopped: true });
        assert_eq!(ts.push(b"c"), Push { text: String::new(), stopped: true });
        assert_eq!(ts.finish(), "");
    }

    #[test]
    fn partial_stop_that_does_not_complete_is_released() {
        let (all, stopped, parts) = run(&["</end>"], &[b"a </e", b"nd", b"x", b" </"]);
        assert!(!stopped);
        assert_eq!(parts, ["a ", "", "</endx", " "]);
        assert_eq!(all, "a </endx </");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        // Both complete in the same push: the one that starts first cuts.
        let (all, stopped, _) = run(&["bc", "abcd"], &[b"xab", b"cd"]);
        assert_eq!((all.as_str(), stopped), ("x", true));
        let (all, stopped, _) = run(&["bc", "abcd"], &[b"xab", b"c!"]);
        assert_eq!((all.as_str(), stopped), ("xa", true));
    }

    #[test]
    fn empty_stop_list_and_invalid_bytes() {
        let (all, stopped, _) = run(&[], &[b"plain ", b"text"]);
        assert_eq!((all.as_str(), stopped), ("plain text", false));
        let (all, _, _) = run(&[""], &[b"ok"]); // an empty stop string is ignored
        assert_eq!(all, "ok");
        // Invalid byte mid-stream and a truncated sequence at the end: U+FFFD each.
        let (all, _, _) = run(&[], &[b"a\xffb", &"é".as_bytes()[..1]]);
        assert_eq!(all, "a\u{FFFD}b\u{FFFD}");
    }

    #[test]
    fn stop_after_multibyte_prefix() {
        let s = "日本".as_bytes();
        let (all, stopped, _) = run(&["本"], &[&s[..4], &s[4..]]);
        assert!(stopped);
        assert_eq!(all, "日");
    }
}
