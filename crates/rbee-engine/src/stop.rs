//! Stop-sequence matching over streamed text.
//!
//! Text that could be the beginning of a stop sequence is held back until it either completes
//! the sequence (then it and everything after it are dropped) or stops matching (then it is
//! released). Released text therefore never contains any part of a stop sequence.

/// What the text pushed so far allows the caller to emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Release {
    /// Safe to emit; generation goes on.
    Text(String),
    /// A stop sequence completed: emit this (the text before it) and end generation.
    Stopped(String),
}

#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> Release {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return Release::Text(std::mem::take(&mut self.pending));
        }
        // Held-back text never contains a whole stop sequence, so any match starts in `pending`.
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            self.pending.truncate(at);
            return Release::Stopped(std::mem::take(&mut self.pending));
        }
        let held = self.longest_partial_match();
        let emit = self.pending.len() - held;
        Release::Text(self.pending.drain(..emit).collect())
    }

    /// Releases what is held back; called when generation ends for another reason.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop sequence.
    fn longest_partial_match(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(self.pending.len());
            for len in (longest + 1..=max).rev() {
                if stop.is_char_boundary(len) && self.pending.ends_with(&stop[..len]) {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn without_stops_everything_is_released_at_once() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("hello"), Release::Text("hello".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn a_stop_inside_one_chunk_truncates() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("abcENDxyz"), Release::Stopped("abc".into()));
    }

    #[test]
    fn a_stop_split_over_chunks_is_held_then_dropped() {
        let mut m = matcher(&["\n\nUser:"]);
        assert_eq!(m.push("Sure.\n"), Release::Text("Sure.".into()));
        assert_eq!(m.push("\nUs"), Release::Text("".into()));
        assert_eq!(m.push("er:"), Release::Stopped("".into()));
    }

    #[test]
    fn a_false_start_is_released_later() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("a ST"), Release::Text("a ".into()));
        assert_eq!(m.push("O"), Release::Text("".into()));
        assert_eq!(m.push("RE"), Release::Text("STORE".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("go ST"), Release::Text("go ".into()));
        assert_eq!(m.flush(), "ST");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut m = matcher(&["world", "lo w"]);
        assert_eq!(m.push("hello world"), Release::Stopped("hel".into()));
    }

    #[test]
    fn multibyte_stops_are_matched_on_char_boundaries() {
        let mut m = matcher(&["ßend"]);
        assert_eq!(m.push("straß"), Release::Text("stra".into()));
        assert_eq!(m.push("e"), Release::Text("".into()));
        assert_eq!(m.push("x"), Release::Text("ßex".into()));
        assert_eq!(m.push("ßend!"), Release::Stopped("".into()));
    }

    #[test]
    fn concatenated_releases_equal_the_text_before_the_stop() {
        let text = "The answer is 42. ###\nmore";
        let mut m = matcher(&["###"]);
        let mut out = String::new();
        for ch in text.chars() {
            match m.push(&ch.to_string()) {
                Release::Text(t) => out.push_str(&t),
                Release::Stopped(t) => {
                    out.push_str(&t);
                    break;
                }
            }
        }
        assert_eq!(out, "The answer is 42. ");
    }
}
