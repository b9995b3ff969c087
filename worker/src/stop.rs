//! Stop-sequence matching across token boundaries.
//!
//! Generated text arrives a token at a time; a stop sequence may span several
//! tokens. The matcher holds back the shortest tail of the text that could
//! still grow into a stop sequence, and releases everything before it. When a
//! stop sequence completes, the text before it is released and the stop text
//! itself never is.

/// What to do with the text pushed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and keep generating.
    Emit(String),
    /// A stop sequence completed: emit this text (the part before the stop
    /// sequence) and finish.
    Stop(String),
}

/// Incremental matcher for a set of stop sequences.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds newly generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Emit(text.to_string());
        }
        self.pending.push_str(text);
        // The earliest complete stop sequence wins.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stop(before);
        }
        let keep = self.held_back_len();
        let emit_to = self.pending.len() - keep;
        let emitted = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        StopOutcome::Emit(emitted)
    }

    /// Releases the held-back text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a
    /// stop sequence (on a char boundary).
    fn held_back_len(&self) -> usize {
        let p = &self.pending;
        (1..=p.len())
            .rev()
            .filter(|&n| p.is_char_boundary(p.len() - n))
            .find(|&n| {
                let tail = &p[p.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Emit(t) => out.push_str(&t),
                StopOutcome::Stop(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_within_one_token() {
        assert_eq!(run(&["END"], &["hello END more"]), ("hello ".into(), true));
    }

    #[test]
    fn stop_across_token_boundaries() {
        assert_eq!(
            run(&["\n\n"], &["one", "\n", "\n", "two"]),
            ("one".into(), true)
        );
        assert_eq!(run(&["STOP"], &["xS", "T", "O", "Py"]), ("x".into(), true));
    }

    #[test]
    fn partial_match_is_released_when_it_diverges() {
        let mut m = StopMatcher::new(["abc".to_string()]);
        assert_eq!(m.push("xa"), StopOutcome::Emit("x".into()));
        assert_eq!(m.push("b"), StopOutcome::Emit("".into()));
        assert_eq!(m.push("d"), StopOutcome::Emit("abd".into()));
    }

    #[test]
    fn held_back_text_is_flushed_at_the_end() {
        assert_eq!(run(&["abc"], &["x", "ab"]), ("xab".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        assert_eq!(run(&["éz"], &["aé", "é", "y"]), ("aééy".into(), false));
        assert_eq!(run(&["éz"], &["aé", "z"]), ("a".into(), true));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), false));
    }
}
