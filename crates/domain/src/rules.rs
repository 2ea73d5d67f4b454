//! The rules that decide a transfer, in the order the API promises. The first rule
//! that fails is the answer; a transfer that passes them all moves `amount` from one
//! card to the other and cannot make either balance negative or over its limit.

use crate::{AffiliateId, CardNo, CardStatus, Money, ProductKind, ResultCode, TransferRequest, UserId};
use chrono::NaiveDate;
use rust_decimal::Decimal;

/// What the rules need to know of one card, its product and the product's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardView {
    pub card_no: CardNo,
    pub user_id: UserId,
    pub status: CardStatus,
    pub expires_on: NaiveDate,
    pub balance: Money,
    pub total_loaded: Money,
    /// The card's own maximum balance if it has one, else its product's.
    pub max_balance: Money,
    pub kind: ProductKind,
    pub owner_affiliate: AffiliateId,
    /// Whether the product's owner affiliate exists (products carry no foreign key).
    pub owner_affiliate_exists: bool,
    pub collection_allowed: bool,
    /// For gift cards: the share of what was loaded that must be used before the
    /// balance may be collected, e.g. `0.6`.
    pub min_usage_rate: Option<Decimal>,
    /// The sequence number of the card's last ledger entry (0 before the first).
    pub sequence: i64,
}

/// Facts about the request that are not in its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferContext {
    /// The affiliate of the calling ASP; `None` when the ASP is not on record.
    pub caller_affiliate: Option<AffiliateId>,
    /// Today in the platform's time zone, for expiry.
    pub today: NaiveDate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply { amount: Money },
    Reject { code: ResultCode, field: Option<&'static str> },
}

impl Decision {
    fn reject(code: ResultCode) -> Self {
        Decision::Reject { code, field: None }
    }
}

fn card_state(card: &CardView, today: NaiveDate) -> Option<ResultCode> {
    let expired = today > card.expires_on;
    match card.kind {
        ProductKind::Gift if card.status != CardStatus::Active => Some(ResultCode::GiftCardNotActive),
        ProductKind::Gift if expired => Some(ResultCode::GiftCardExpired),
        _ if card.status != CardStatus::Active || expired => Some(ResultCode::CardStatusNotAllowed),
        _ => None,
    }
}

/// The share of what was loaded onto a card that has been spent. A card that was
/// never loaded has used nothing.
pub fn usage_rate(card: &CardView) -> Decimal {
    if card.total_loaded.is_zero() {
        return Decimal::ZERO;
    }
    (card.total_loaded - card.balance) / card.total_loaded.get()
}

/// Decides a transfer. `from` and `to` are the cards as loaded for the request's
/// card numbers (`None` when no such card exists).
pub fn decide(
    request: &TransferRequest,
    from: Option<&CardView>,
    to: Option<&CardView>,
    ctx: &TransferContext,
) -> Decision {
    if request.from_card_no == request.to_card_no {
        return Decision::reject(ResultCode::SameCard);
    }
    let registered = |card: Option<&CardView>| card.filter(|c| c.user_id == request.user_id).cloned();
    let Some(from) = registered(from) else {
        return Decision::Reject { code: ResultCode::CardNotFound, field: Some("fromCardNo") };
    };
    let Some(to) = registered(to) else {
        return Decision::Reject { code: ResultCode::CardNotFound, field: Some("toCardNo") };
    };
    let cards = [&from, &to];
    for card in cards {
        if let Some(code) = card_state(card, ctx.today) {
            return Decision::reject(code);
        }
    }
    if cards.iter().any(|c| !c.owner_affiliate_exists) {
        return Decision::reject(ResultCode::OwnerAffiliateNotFound);
    }
    if cards.iter().any(|c| ctx.caller_affiliate.as_ref() != Some(&c.owner_affiliate)) {
        return Decision::reject(ResultCode::AffiliateMismatch);
    }
    if cards.iter().any(|c| !c.collection_allowed) {
        return Decision::reject(ResultCode::CollectionNotAllowed);
    }
    if from.kind == ProductKind::Gift {
        if let Some(min) = from.min_usage_rate {
            if usage_rate(&from) < min {
                return Decision::reject(ResultCode::UsageRateTooLow);
            }
        }
    }
    if from.balance.is_zero() {
        return Decision::reject(ResultCode::CollectionBalanceZero);
    }
    let amount = match request.amount {
        None => from.balance,
        Some(a) if a.is_zero() => from.balance,
        Some(a) => a,
    };
    if amount > from.balance {
        return Decision::reject(ResultCode::InsufficientBalance);
    }
    if to.balance + amount > to.max_balance {
        return Decision::reject(ResultCode::BalanceOverMax);
    }
    Decision::Apply { amount }
}

/// One side of an applied transfer: what it did to one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub card_no: CardNo,
    pub user_id: UserId,
    /// Negative for the debit, positive for the credit.
    pub delta: Decimal,
    pub balance_after: Money,
    pub sequence: i64,
}

/// Moves `amount` between two cards that `decide` approved, returning the debit and
/// the credit posting. The receiving card's total loaded grows by what it received:
/// collected balance counts as loaded for the usage rate of the card that holds it.
pub fn apply(from: &mut CardView, to: &mut CardView, amount: Money) -> (Posting, Posting) {
    from.balance = from.balance.checked_sub(amount).expect("decide() approved no more than the balance");
    from.sequence += 1;
    to.balance = to.balance + amount;
    to.total_loaded = to.total_loaded + amount;
    to.sequence += 1;
    (
        Posting {
            card_no: from.card_no.clone(),
            user_id: from.user_id,
            delta: -amount.get(),
            balance_after: from.balance,
            sequence: from.sequence,
        },
        Posting {
            card_no: to.card_no.clone(),
            user_id: to.user_id,
            delta: amount.get(),
            balance_after: to.balance,
            sequence: to.sequence,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 24).unwrap()
    }

    fn af() -> AffiliateId {
        AffiliateId("AF0000000001".into())
    }

    fn card(no: &str, balance: u64) -> CardView {
        CardView {
            card_no: CardNo::parse(no).unwrap(),
            user_id: UserId::new(1001).unwrap(),
            status: CardStatus::Active,
            expires_on: NaiveDate::from_ymd_opt(2030, 12, 31).unwrap(),
            balance: Money::from_units(balance),
            total_loaded: Money::from_units(balance),
            max_balance: Money::from_units(2_000_000),
            kind: ProductKind::Prepaid,
            owner_affiliate: af(),
            owner_affiliate_exists: true,
            collection_allowed: true,
            min_usage_rate: None,
            sequence: 0,
        }
    }

    const A: &str = "9410000000000001";
    const B: &str = "9410000000000002";

    fn req(amount: Option<u64>) -> TransferRequest {
        TransferRequest {
            user_id: UserId::new(1001).unwrap(),
            from_card_no: CardNo::parse(A).unwrap(),
            to_card_no: CardNo::parse(B).unwrap(),
            amount: amount.map(Money::from_units),
        }
    }

    fn ctx() -> TransferContext {
        TransferContext { caller_affiliate: Some(af()), today: today() }
    }

    fn decide_with(r: &TransferRequest, from: &CardView, to: &CardView) -> Decision {
        decide(r, Some(from), Some(to), &ctx())
    }

    fn rejected(code: ResultCode) -> Decision {
        Decision::Reject { code, field: None }
    }

    /// Every rule of the documented order broken at once; mending the one that
    /// answered reveals the next, so the answers come out in exactly that order.
    #[test]
    fn with_every_rule_broken_the_answers_follow_the_documented_order() {
        let other_member = UserId::new(2002).unwrap();
        let mut from = card(A, 0);
        from.kind = ProductKind::Gift;
        from.user_id = other_member;
        from.status = CardStatus::Suspended;
        from.expires_on = today().pred_opt().unwrap();
        from.owner_affiliate_exists = false;
        from.owner_affiliate = AffiliateId("AF0000000999".into());
        from.collection_allowed = false;
        from.min_usage_rate = Some(Decimal::new(15, 1)); // above any usage: always too low
        from.total_loaded = Money::from_units(100);
        let mut to = card(B, 1_999_990);
        let mut request = req(Some(500));
        request.to_card_no = request.from_card_no.clone();

        let mut answers = Vec::new();
        let mend = |step: usize, from: &mut CardView, to: &mut CardView, request: &mut TransferRequest| match step {
            0 => request.to_card_no = CardNo::parse(B).unwrap(),
            1 => from.user_id = request.user_id,
            2 => from.status = CardStatus::Active,
            3 => from.expires_on = today(),
            4 => from.owner_affiliate_exists = true,
            5 => from.owner_affiliate = af(),
            6 => from.collection_allowed = true,
            7 => from.min_usage_rate = None,
            8 => from.balance = Money::from_units(100),
            9 => request.amount = Some(Money::from_units(50)),
            10 => to.balance = Money::ZERO,
            _ => unreachable!(),
        };
        for step in 0..=11 {
            match decide_with(&request, &from, &to) {
                Decision::Reject { code, .. } => answers.push(code),
                Decision::Apply { amount } => {
                    assert_eq!(amount, Money::from_units(50));
                    break;
                }
            }
            mend(step, &mut from, &mut to, &mut request);
        }
        use ResultCode::*;
        assert_eq!(
            answers,
            vec![
                SameCard,
                CardNotFound,
                GiftCardNotActive,
                GiftCardExpired,
                OwnerAffiliateNotFound,
                AffiliateMismatch,
                CollectionNotAllowed,
                UsageRateTooLow,
                CollectionBalanceZero,
                InsufficientBalance,
                BalanceOverMax,
            ]
        );
    }

    #[test]
    fn a_transfer_within_balance_and_limit_applies() {
        assert_eq!(
            decide_with(&req(Some(300)), &card(A, 500), &card(B, 0)),
            Decision::Apply { amount: Money::from_units(300) }
        );
    }

    #[test]
    fn null_or_zero_amount_moves_the_whole_balance() {
        for amount in [None, Some(0)] {
            assert_eq!(
                decide_with(&req(amount), &card(A, 500), &card(B, 0)),
                Decision::Apply { amount: Money::from_units(500) }
            );
        }
    }

    #[test]
    fn same_card_is_rejected_first() {
        let mut r = req(Some(1));
        r.to_card_no = r.from_card_no.clone();
        assert_eq!(decide(&r, None, None, &ctx()), rejected(ResultCode::SameCard));
    }

    #[test]
    fn a_missing_card_names_its_field() {
        let r = req(Some(1));
        assert_eq!(
            decide(&r, None, Some(&card(B, 0)), &ctx()),
            Decision::Reject { code: ResultCode::CardNotFound, field: Some("fromCardNo") }
        );
        assert_eq!(
            decide(&r, Some(&card(A, 5)), None, &ctx()),
            Decision::Reject { code: ResultCode::CardNotFound, field: Some("toCardNo") }
        );
    }

    #[test]
    fn a_card_of_another_member_is_not_found() {
        let mut to = card(B, 0);
        to.user_id = UserId::new(2002).unwrap();
        assert_eq!(
            decide_with(&req(Some(1)), &card(A, 5), &to),
            Decision::Reject { code: ResultCode::CardNotFound, field: Some("toCardNo") }
        );
    }

    #[test]
    fn a_gift_card_not_active_is_017_007() {
        let mut from = card(A, 5);
        from.kind = ProductKind::Gift;
        from.status = CardStatus::Suspended;
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::GiftCardNotActive));
    }

    #[test]
    fn an_expired_gift_card_is_017_008() {
        let mut to = card(B, 0);
        to.kind = ProductKind::Gift;
        to.expires_on = today().pred_opt().unwrap();
        assert_eq!(decide_with(&req(None), &card(A, 5), &to), rejected(ResultCode::GiftCardExpired));
    }

    #[test]
    fn a_card_expiring_today_is_still_valid() {
        let mut from = card(A, 5);
        from.expires_on = today();
        assert!(matches!(decide_with(&req(None), &from, &card(B, 0)), Decision::Apply { .. }));
    }

    #[test]
    fn other_cards_not_active_or_expired_are_017_010() {
        for status in CardStatus::ALL.into_iter().filter(|s| *s != CardStatus::Active) {
            let mut from = card(A, 5);
            from.status = status;
            assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::CardStatusNotAllowed));
        }
        let mut to = card(B, 0);
        to.expires_on = today().pred_opt().unwrap();
        assert_eq!(decide_with(&req(None), &card(A, 5), &to), rejected(ResultCode::CardStatusNotAllowed));
    }

    #[test]
    fn a_missing_owner_affiliate_is_017_006() {
        let mut to = card(B, 0);
        to.owner_affiliate_exists = false;
        assert_eq!(decide_with(&req(None), &card(A, 5), &to), rejected(ResultCode::OwnerAffiliateNotFound));
    }

    #[test]
    fn another_affiliates_product_is_017_004() {
        let mut from = card(A, 5);
        from.owner_affiliate = AffiliateId("AF0000000002".into());
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::AffiliateMismatch));
        let no_caller = TransferContext { caller_affiliate: None, today: today() };
        assert_eq!(
            decide(&req(None), Some(&card(A, 5)), Some(&card(B, 0)), &no_caller),
            rejected(ResultCode::AffiliateMismatch)
        );
    }

    #[test]
    fn a_product_without_collection_is_017_005() {
        let mut from = card(A, 5);
        from.collection_allowed = false;
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::CollectionNotAllowed));
    }

    #[test]
    fn a_gift_card_used_less_than_its_minimum_is_017_009() {
        let mut from = card(A, 500);
        from.kind = ProductKind::Gift;
        from.total_loaded = Money::from_units(1000);
        from.min_usage_rate = Some(Decimal::new(6, 1));
        // used 50% < 60%
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::UsageRateTooLow));
        // used exactly 60% is enough
        from.balance = Money::from_units(400);
        assert!(matches!(decide_with(&req(None), &from, &card(B, 0)), Decision::Apply { .. }));
    }

    #[test]
    fn a_zero_balance_is_005_017() {
        assert_eq!(decide_with(&req(None), &card(A, 0), &card(B, 0)), rejected(ResultCode::CollectionBalanceZero));
    }

    #[test]
    fn more_than_the_balance_is_005_018() {
        assert_eq!(decide_with(&req(Some(501)), &card(A, 500), &card(B, 0)), rejected(ResultCode::InsufficientBalance));
    }

    #[test]
    fn over_the_receivers_limit_is_017_001_and_the_cards_own_limit_wins() {
        let mut to = card(B, 1_999_900);
        assert_eq!(decide_with(&req(Some(101)), &card(A, 500), &to), rejected(ResultCode::BalanceOverMax));
        assert!(matches!(decide_with(&req(Some(100)), &card(A, 500), &to), Decision::Apply { .. }));
        to.max_balance = Money::from_units(2_000_100);
        assert!(matches!(decide_with(&req(Some(200)), &card(A, 500), &to), Decision::Apply { .. }));
    }

    #[test]
    fn apply_moves_the_amount_and_numbers_the_postings() {
        let (mut from, mut to) = (card(A, 500), card(B, 10));
        to.sequence = 7;
        let (debit, credit) = apply(&mut from, &mut to, Money::from_units(200));
        assert_eq!(
            (debit.delta, debit.balance_after, debit.sequence),
            (Decimal::from(-200), Money::from_units(300), 1)
        );
        assert_eq!(
            (credit.delta, credit.balance_after, credit.sequence),
            (Decimal::from(200), Money::from_units(210), 8)
        );
        assert_eq!(to.total_loaded, Money::from_units(210));
    }

    fn any_status() -> impl Strategy<Value = CardStatus> {
        prop::sample::select(CardStatus::ALL.to_vec())
    }

    fn any_card(no: &'static str) -> impl Strategy<Value = CardView> {
        (
            0u64..3_000,
            0u64..3_000,
            1_000u64..4_000,
            any_status(),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
            prop::option::of(0u32..=10),
            prop::bool::weighted(0.1),
            // Most generated cards are active so that the later rules get exercised.
            prop::bool::weighted(0.8),
        )
            .prop_map(
                move |(
                    balance,
                    extra_loaded,
                    max,
                    status,
                    expired,
                    gift,
                    no_owner,
                    other_owner,
                    no_collection,
                    rate,
                    other_member,
                    active,
                )| {
                    let mut c = card(no, balance);
                    c.total_loaded = Money::from_units(balance + extra_loaded);
                    c.max_balance = Money::from_units(max);
                    c.status = if active { CardStatus::Active } else { status };
                    if expired {
                        c.expires_on = today().pred_opt().unwrap();
                    }
                    if gift {
                        c.kind = ProductKind::Gift;
                        c.min_usage_rate = rate.map(|r| Decimal::new(r as i64, 1));
                    }
                    c.owner_affiliate_exists = !no_owner;
                    if other_owner {
                        c.owner_affiliate = AffiliateId("AF0000000002".into());
                    }
                    c.collection_allowed = !no_collection;
                    if other_member {
                        c.user_id = UserId::new(2002).unwrap();
                    }
                    c
                },
            )
    }

    fn rank(code: ResultCode) -> usize {
        use ResultCode::*;
        [
            SameCard,
            CardNotFound,
            GiftCardNotActive,
            GiftCardExpired,
            CardStatusNotAllowed,
            OwnerAffiliateNotFound,
            AffiliateMismatch,
            CollectionNotAllowed,
            UsageRateTooLow,
            CollectionBalanceZero,
            InsufficientBalance,
            BalanceOverMax,
        ]
        .iter()
        .position(|c| *c == code)
        .expect("decide only answers rule codes")
    }

    proptest! {
        #[test]
        fn an_applied_transfer_conserves_money_and_respects_limits(
            from in any_card(A), to in any_card(B), amount in prop::option::of(0u64..4_000)
        ) {
            let r = req(amount);
            if let Decision::Apply { amount } = decide_with(&r, &from, &to) {
                let (mut f, mut t) = (from.clone(), to.clone());
                let (debit, credit) = apply(&mut f, &mut t, amount);
                prop_assert_eq!(f.balance.get() + t.balance.get(), from.balance.get() + to.balance.get());
                prop_assert_eq!(debit.delta + credit.delta, Decimal::ZERO);
                prop_assert!(t.balance <= t.max_balance);
                prop_assert!(!amount.is_zero());
                prop_assert_eq!(f.sequence, from.sequence + 1);
                prop_assert_eq!(t.sequence, to.sequence + 1);
            }
        }

        #[test]
        fn a_rejection_is_the_first_failing_rule(
            from in any_card(A), to in any_card(B), amount in prop::option::of(0u64..4_000)
        ) {
            let r = req(amount);
            if let Decision::Reject { code, .. } = decide_with(&r, &from, &to) {
                // Repairing the reported fault and everything after it can only make a
                // later rule answer, never an earlier one.
                let mut f = from.clone();
                let mut t = to.clone();
                for c in [&mut f, &mut t] {
                    c.user_id = UserId::new(1001).unwrap();
                    c.status = CardStatus::Active;
                    c.expires_on = today();
                    c.owner_affiliate_exists = true;
                    c.owner_affiliate = af();
                    c.collection_allowed = true;
                    c.min_usage_rate = None;
                }
                f.balance = Money::from_units(1);
                t.balance = Money::ZERO;
                let repaired = decide_with(&req(Some(1)), &f, &t);
                prop_assert_eq!(repaired, Decision::Apply { amount: Money::from_units(1) });
                // And an earlier rule never hides behind a later one: check each rule's
                // own condition directly for the rules before the reported one.
                let first_bad = [
                    (from.user_id != r.user_id, ResultCode::CardNotFound),
                    (to.user_id != r.user_id, ResultCode::CardNotFound),
                ];
                for (bad, c) in first_bad {
                    if bad { prop_assert!(rank(code) <= rank(c)); }
                }
                if from.user_id == r.user_id && to.user_id == r.user_id {
                    let state = card_state(&from, today()).or(card_state(&to, today()));
                    if let Some(s) = state { prop_assert_eq!(code, s); }
                }
            }
        }

        #[test]
        fn no_decision_ever_overdraws_a_card(
            from in any_card(A), to in any_card(B), amount in prop::option::of(0u64..4_000)
        ) {
            if let Decision::Apply { amount } = decide_with(&req(amount), &from, &to) {
                prop_assert!(amount <= from.balance);
            }
        }
    }
}
