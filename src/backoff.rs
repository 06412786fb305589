//! Exponential backoff between retries of etcd calls.

use std::time::Duration;

/// Exponential backoff from 200 ms to 10 s for etcd retries.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Backoff {
            next: Self::MIN,
            max: Self::MAX,
        }
    }

    /// A backoff that never waits longer than `max` (at least the 200 ms minimum).
    pub fn with_max(max: Duration) -> Self {
        Backoff {
            next: Self::MIN,
            max: max.clamp(Self::MIN, Self::MAX),
        }
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.advance()).await;
    }

    /// The pause to take now; doubles the next one, up to the maximum.
    fn advance(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pauses(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map(|_| b.advance()).collect()
    }

    #[test]
    fn doubles_from_200ms_up_to_10s() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new();
        assert_eq!(
            pauses(&mut b, 8),
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(6400),
                ms(10_000),
                ms(10_000)
            ]
        );
        b.reset();
        assert_eq!(b.advance(), ms(200));
    }

    #[test]
    fn with_max_caps_within_the_bounds() {
        let ms = Duration::from_millis;
        let mut b = Backoff::with_max(Duration::from_secs(2));
        assert_eq!(
            pauses(&mut b, 5),
            [ms(200), ms(400), ms(800), ms(1600), ms(2000)]
        );
        let mut tiny = Backoff::with_max(Duration::ZERO);
        assert_eq!(pauses(&mut tiny, 2), [ms(200), ms(200)]);
        let mut huge = Backoff::with_max(Duration::from_secs(3600));
        assert_eq!(pauses(&mut huge, 8).last(), Some(&ms(10_000)));
    }
}
