use crate::Duration;
use crate::connection::spaces::PendingAcks;
use crate::frame::AckFrequency;
use crate::transport_parameters::TransportParameters;
use crate::{AckFrequencyConfig, Instant, TIMER_GRANULARITY, TransportError, VarInt};

/// State associated to ACK frequency
pub(super) struct AckFrequencyState {
    //
    // Sending ACK_FREQUENCY frames
    //
    in_flight_ack_frequency_frame: Option<(u64, Duration)>,
    next_outgoing_sequence_number: VarInt,
    pub(super) peer_max_ack_delay: Duration,
    /// Until when an exact `max_ack_delay` is set aside after a loss (Tutti's change)
    fallback_until: Option<Instant>,
    /// The ack-eliciting threshold of the last ACK_FREQUENCY frame sent (Tutti's change)
    requested_threshold: Option<VarInt>,
    /// When the last ack-eliciting packet of the data space was sent (Tutti's change)
    last_sent: Option<Instant>,
    /// The smoothed time between ack-eliciting packets of the data space (Tutti's change)
    send_interval: Option<Duration>,
    /// Whether those packets come sparsely, with hysteresis; only ever set with
    /// `sparse_fallback` (Tutti's change)
    sparse: bool,
    /// The packet that last asked for an ACK at once as the congestion window filled
    /// (Tutti's change: [`AckFrequencyConfig::immediate_ack_when_window_fills`])
    window_ack_pn: Option<u64>,

    //
    // Receiving ACK_FREQUENCY frames
    //
    last_ack_frequency_frame: Option<u64>,
    pub(super) max_ack_delay: Duration,
}

impl AckFrequencyState {
    pub(super) fn new(default_max_ack_delay: Duration) -> Self {
        Self {
            in_flight_ack_frequency_frame: None,
            next_outgoing_sequence_number: VarInt(0),
            peer_max_ack_delay: default_max_ack_delay,
            fallback_until: None,
            requested_threshold: None,
            last_sent: None,
            send_interval: None,
            sparse: false,
            window_ack_pn: None,

            last_ack_frequency_frame: None,
            max_ack_delay: default_max_ack_delay,
        }
    }

    /// Returns the `max_ack_delay` that should be requested of the peer when sending an
    /// ACK_FREQUENCY frame
    pub(super) fn candidate_max_ack_delay(
        &self,
        now: Instant,
        rtt: Duration,
        config: &AckFrequencyConfig,
        peer_params: &TransportParameters,
    ) -> Duration {
        let min_ack_delay =
            Duration::from_micros(peer_params.min_ack_delay.map_or(0, |x| x.into()));

        // Use the peer's max_ack_delay if no custom max_ack_delay was provided in the config
        let candidate = config.max_ack_delay.unwrap_or(self.peer_max_ack_delay);

        // Tutti's change (PATCHES.md): a configured delay asked for as it is
        let candidate = match config.max_ack_delay {
            // ... unless a packet was lost lately, or packets go out sparsely: then the
            // peer's own delay
            Some(configured)
                if config.exact_max_ack_delay && (self.in_fallback(now) || self.sparse) =>
            {
                let own = Duration::from_millis(peer_params.max_ack_delay.into());
                Ord::min(configured, own)
            }
            Some(configured) if config.exact_max_ack_delay => configured,
            // Should be less than the RTT (itself at least `MIN_AUTOMATIC_ACK_DELAY`)
            _ => Ord::min(candidate, Ord::max(rtt, MIN_AUTOMATIC_ACK_DELAY)),
        };

        // Must be no smaller than the `min_ack_delay` advertised by the peer
        Ord::max(candidate, min_ack_delay)
    }

    /// Whether an exact `max_ack_delay` is set aside now, after a loss (Tutti's change)
    fn in_fallback(&self, now: Instant) -> bool {
        self.fallback_until.is_some_and(|t| now < t)
    }

    /// Returns the ack-eliciting threshold to request of the peer: the configured one,
    /// or at most 1 (an ACK for every second packet, as without the extension) while
    /// an exact `max_ack_delay` is set aside after a loss (Tutti's change)
    pub(super) fn candidate_ack_eliciting_threshold(
        &self,
        now: Instant,
        config: &AckFrequencyConfig,
    ) -> VarInt {
        if config.exact_max_ack_delay && self.in_fallback(now) {
            Ord::min(config.ack_eliciting_threshold, VarInt(1))
        } else {
            config.ack_eliciting_threshold
        }
    }

    /// Returns the `max_ack_delay` for the purposes of calculating the PTO
    ///
    /// This `max_ack_delay` is defined as the maximum of the peer's current `max_ack_delay` and all
    /// in-flight `max_ack_delay`s (i.e. proposed values that haven't been acknowledged yet, but
    /// might be already in use by the peer).
    pub(super) fn max_ack_delay_for_pto(&self) -> Duration {
        // Note: we have at most one in-flight ACK_FREQUENCY frame
        if let Some((_, max_ack_delay)) = self.in_flight_ack_frequency_frame {
            self.peer_max_ack_delay.max(max_ack_delay)
        } else {
            self.peer_max_ack_delay
        }
    }

    /// Returns the next sequence number for an ACK_FREQUENCY frame
    pub(super) fn next_sequence_number(&mut self) -> VarInt {
        assert!(self.next_outgoing_sequence_number <= VarInt::MAX);

        let seq = self.next_outgoing_sequence_number;
        self.next_outgoing_sequence_number.0 += 1;
        seq
    }

    /// Returns true if we should send an ACK_FREQUENCY frame
    pub(super) fn should_send_ack_frequency(
        &self,
        now: Instant,
        rtt: Duration,
        config: &AckFrequencyConfig,
        peer_params: &TransportParameters,
    ) -> bool {
        if self.next_outgoing_sequence_number.0 == 0 {
            // Always send at startup
            return true;
        }
        if self.requested_threshold != Some(self.candidate_ack_eliciting_threshold(now, config)) {
            return true;
        }
        let current = self
            .in_flight_ack_frequency_frame
            .map_or(self.peer_max_ack_delay, |(_, pending)| pending);
        let desired = self.candidate_max_ack_delay(now, rtt, config, peer_params);
        let error = (desired.as_secs_f32() / current.as_secs_f32()) - 1.0;
        error.abs() > MAX_RTT_ERROR
    }

    /// Notifies the [`AckFrequencyState`] that a packet containing an ACK_FREQUENCY frame was sent
    pub(super) fn ack_frequency_sent(
        &mut self,
        pn: u64,
        requested_max_ack_delay: Duration,
        requested_threshold: VarInt,
    ) {
        self.in_flight_ack_frequency_frame = Some((pn, requested_max_ack_delay));
        self.requested_threshold = Some(requested_threshold);
    }

    /// Notifies the [`AckFrequencyState`] that an ack-eliciting packet of the data space
    /// was declared lost (Tutti's change: [`AckFrequencyConfig::loss_fallback`])
    pub(super) fn on_lost(&mut self, now: Instant, config: &AckFrequencyConfig) {
        if config.exact_max_ack_delay && !config.loss_fallback.is_zero() {
            self.fallback_until = Some(now + config.loss_fallback);
        }
    }

    /// Notifies the [`AckFrequencyState`] that an ack-eliciting packet of the data space was
    /// sent (Tutti's change: [`AckFrequencyConfig::sparse_fallback`])
    pub(super) fn on_ack_eliciting_sent(&mut self, now: Instant, config: &AckFrequencyConfig) {
        if !(config.exact_max_ack_delay && config.sparse_fallback) {
            return;
        }
        let last = self.last_sent.replace(now);
        let (Some(configured), Some(last)) = (config.max_ack_delay, last) else {
            return;
        };
        let sample = now.saturating_duration_since(last);
        let smoothed = match self.send_interval {
            Some(s) => (s * 7 + sample) / 8,
            None => sample,
        };
        self.send_interval = Some(smoothed);
        if smoothed > configured {
            self.sparse = true;
        } else if smoothed <= configured / 2 {
            self.sparse = false;
        }
    }

    /// Whether a packet may ask for an ACK at once as the congestion window fills: none
    /// did yet, or the one that did, or a later one, was acknowledged (Tutti's change:
    /// [`AckFrequencyConfig::immediate_ack_when_window_fills`])
    pub(super) fn window_ack_allowed(&self, largest_acked: Option<u64>) -> bool {
        match (self.window_ack_pn, largest_acked) {
            (None, _) => true,
            (Some(pn), Some(acked)) => acked >= pn,
            (Some(_), None) => false,
        }
    }

    /// Notes that packet `pn` asks for an ACK at once as the congestion window fills
    /// (Tutti's change)
    pub(super) fn on_window_ack_requested(&mut self, pn: u64) {
        self.window_ack_pn = Some(pn);
    }

    /// Notifies the [`AckFrequencyState`] that a packet has been ACKed
    pub(super) fn on_acked(&mut self, pn: u64) {
        match self.in_flight_ack_frequency_frame {
            Some((number, requested_max_ack_delay)) if number == pn => {
                self.in_flight_ack_frequency_frame = None;
                self.peer_max_ack_delay = requested_max_ack_delay;
            }
            _ => {}
        }
    }

    /// Notifies the [`AckFrequencyState`] that an ACK_FREQUENCY frame was received
    ///
    /// Updates the endpoint's params according to the payload of the ACK_FREQUENCY frame, or
    /// returns an error in case the requested `max_ack_delay` is invalid.
    ///
    /// Returns `true` if the frame was processed and `false` if it was ignored because of being
    /// stale.
    pub(super) fn ack_frequency_received(
        &mut self,
        frame: &AckFrequency,
        pending_acks: &mut PendingAcks,
    ) -> Result<bool, TransportError> {
        if self
            .last_ack_frequency_frame
            .is_some_and(|highest_sequence_nr| frame.sequence.into_inner() <= highest_sequence_nr)
        {
            return Ok(false);
        }

        self.last_ack_frequency_frame = Some(frame.sequence.into_inner());

        // Update max_ack_delay
        let max_ack_delay = Duration::from_micros(frame.request_max_ack_delay.into_inner());
        if max_ack_delay < TIMER_GRANULARITY {
            return Err(TransportError::PROTOCOL_VIOLATION(
                "Requested Max Ack Delay in ACK_FREQUENCY frame is less than min_ack_delay",
            ));
        }
        self.max_ack_delay = max_ack_delay;

        // Update the rest of the params
        pending_acks.set_ack_frequency_params(frame);

        Ok(true)
    }
}

/// Maximum proportion difference between the most recently requested max ACK delay and the
/// currently desired one before a new request is sent, when the peer supports the ACK frequency
/// extension and an explicit max ACK delay is not configured.
const MAX_RTT_ERROR: f32 = 0.2;

/// Minimum value to request the peer set max ACK delay to when the peer supports the ACK frequency
/// extension and an explicit max ACK delay is not configured.
// Keep in sync with `AckFrequencyConfig::max_ack_delay` documentation
const MIN_AUTOMATIC_ACK_DELAY: Duration = Duration::from_millis(25);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Side;

    #[test]
    fn peer_min_ack_delay_can_exceed_rtt() {
        let params = TransportParameters {
            min_ack_delay: Some(100_000u32.into()),
            max_ack_delay: 100u32.into(),
            ..TransportParameters::default()
        };
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        let params = TransportParameters::read(Side::Client, &mut encoded.as_slice())
            .expect("peer parameters must pass wire-level validation");
        let state = AckFrequencyState::new(Duration::from_millis(100));
        let delay = state.candidate_max_ack_delay(
            Instant::now(),
            Duration::from_millis(5),
            &AckFrequencyConfig::default(),
            &params,
        );
        assert_eq!(delay, Duration::from_millis(100));
    }

    #[test]
    fn peer_min_ack_delay_can_exceed_rtt_with_large_max() {
        let params = TransportParameters {
            min_ack_delay: Some(100_000u32.into()),
            max_ack_delay: 200u32.into(),
            ..TransportParameters::default()
        };
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        let params = TransportParameters::read(Side::Client, &mut encoded.as_slice())
            .expect("peer parameters must pass wire-level validation");
        let state = AckFrequencyState::new(Duration::from_millis(100));
        let delay = state.candidate_max_ack_delay(
            Instant::now(),
            Duration::from_millis(5),
            &AckFrequencyConfig::default(),
            &params,
        );
        assert_eq!(delay, Duration::from_millis(100));
    }
}
