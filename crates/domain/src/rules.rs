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

/// Whether a card has spent less than `min` of what was loaded onto it:
/// `(loaded − balance) / loaded < min`, compared as `loaded − balance < min × loaded`
/// so that no division rounds (a rate of 2/3 has no exact decimal, and its rounded
/// quotient could equal a minimum it is below). A card that was never loaded has
/// used nothing.
fn used_less_than(card: &CardView, min: Decimal) -> bool {
    let loaded = card.total_loaded.get();
    if loaded.is_zero() {
        return Decimal::ZERO < min;
    }
    loaded - card.balance.get() < min * loaded
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
            if used_less_than(&from, min) {
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
    fn a_gift_card_is_held_to_its_minimum_exactly_not_to_a_rounded_quotient() {
        let mut from = card(A, 1);
        from.kind = ProductKind::Gift;
        from.total_loaded = Money::from_units(3);
        // Used 2/3, whose 28-digit quotient rounds up to exactly this minimum.
        from.min_usage_rate = Some("0.6666666666666666666666666667".parse().unwrap());
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::UsageRateTooLow));
        from.min_usage_rate = Some("0.6666666666666666666666666666".parse().unwrap());
        assert!(matches!(decide_with(&req(None), &from, &card(B, 0)), Decision::Apply { .. }));
    }

    #[test]
    fn a_gift_card_never_loaded_has_used_nothing() {
        let mut from = card(A, 0);
        from.kind = ProductKind::Gift;
        from.min_usage_rate = Some(Decimal::new(6, 1));
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::UsageRateTooLow));
        from.min_usage_rate = Some(Decimal::ZERO);
        assert_eq!(decide_with(&req(None), &from, &card(B, 0)), rejected(ResultCode::CollectionBalanceZero));
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
            // A zero balance often enough for its rule to come up.
            prop_oneof![1 => Just(0u64), 9 => 0u64..3_000],
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

    /// The README's order of the rules ("The order of the rules") as a table, written
    /// apart from `decide`'s early returns: the first row that holds is the answer.
    /// The usage rate is compared in whole tenths, as the cases generate it.
    fn documented(r: &TransferRequest, from: Option<&CardView>, to: Option<&CardView>) -> Decision {
        use ResultCode::*;
        let reject = |code, field| Decision::Reject { code, field };
        let registered = |c: Option<&CardView>| c.is_some_and(|c| c.user_id == r.user_id);
        let first = [
            (r.from_card_no == r.to_card_no, SameCard, None),
            (!registered(from), CardNotFound, Some("fromCardNo")),
            (!registered(to), CardNotFound, Some("toCardNo")),
        ];
        if let Some((_, code, field)) = first.into_iter().find(|row| row.0) {
            return reject(code, field);
        }
        let (from, to) = (from.unwrap(), to.unwrap());
        let state = |c: &CardView| {
            let (gift, active, expired) =
                (c.kind == ProductKind::Gift, c.status == CardStatus::Active, today() > c.expires_on);
            [
                (gift && !active, GiftCardNotActive),
                (gift && expired, GiftCardExpired),
                (!gift && (!active || expired), CardStatusNotAllowed),
            ]
        };
        let units = |m: Money| m.get().normalize().to_string().parse::<i128>().unwrap();
        let (balance, loaded) = (units(from.balance), units(from.total_loaded));
        let too_little_used = from.kind == ProductKind::Gift
            && from.min_usage_rate.is_some_and(|min| {
                let tenths = (min * Decimal::TEN).normalize().to_string().parse::<i128>().unwrap();
                if loaded == 0 {
                    tenths > 0
                } else {
                    (loaded - balance) * 10 < tenths * loaded
                }
            });
        let amount = match r.amount {
            Some(a) if !a.is_zero() => a,
            _ => from.balance,
        };
        let later = [
            state(from),
            state(to),
            [
                (!from.owner_affiliate_exists || !to.owner_affiliate_exists, OwnerAffiliateNotFound),
                (from.owner_affiliate != af() || to.owner_affiliate != af(), AffiliateMismatch),
                (!from.collection_allowed || !to.collection_allowed, CollectionNotAllowed),
            ],
            [
                (too_little_used, UsageRateTooLow),
                (balance == 0, CollectionBalanceZero),
                (units(amount) > balance, InsufficientBalance),
            ],
        ]
        .concat();
        let over_max = units(to.balance) + units(amount) > units(to.max_balance);
        match later.into_iter().chain([(over_max, BalanceOverMax)]).find(|row| row.0) {
            Some((_, code)) => reject(code, None),
            None => Decision::Apply { amount },
        }
    }

    /// A request and the two cards as loaded for it (`None`: no such card).
    type Case = (TransferRequest, Option<CardView>, Option<CardView>);

    /// Cards with every rule's fault now and then, small balances and limits.
    fn random_case() -> impl Strategy<Value = Case> {
        (
            prop::option::weighted(0.97, any_card(A)),
            prop::option::weighted(0.97, any_card(B)),
            prop::option::of(0u64..4_000),
            prop::bool::weighted(0.03),
        )
            .prop_map(|(from, to, amount, same)| {
                let mut r = req(amount);
                if same {
                    r.to_card_no = r.from_card_no.clone();
                }
                (r, from, to)
            })
    }

    /// Valid cards up to the largest amounts, at the edges of the money rules: an
    /// amount of the whole balance or one off it, a receiving card that lands on
    /// its limit or one over.
    fn boundary_case() -> impl Strategy<Value = Case> {
        let max = Money::MAX_REQUEST_AMOUNT as u64;
        (0u64..=max, 0u64..=max, -1i64..=1, -1i64..=1, 0u8..3).prop_map(
            move |(balance, to_balance, off_amount, off_limit, how)| {
                let from = card(A, balance);
                let mut to = card(B, to_balance);
                let asked = (balance as i64 + off_amount).clamp(0, max as i64) as u64;
                let amount = match how {
                    0 => None,
                    1 => Some(0),
                    _ => Some(asked),
                };
                let moved = if matches!(amount, Some(a) if a > 0) { asked } else { balance };
                let limit = (to_balance as i128 + moved as i128 + off_limit as i128).max(0) as u64;
                to.max_balance = Money::from_units(limit);
                (req(amount), Some(from), Some(to))
            },
        )
    }

    fn any_case() -> impl Strategy<Value = Case> {
        prop_oneof![random_case(), boundary_case()]
    }

    fn decide_case((r, from, to): &Case) -> Decision {
        decide(r, from.as_ref(), to.as_ref(), &ctx())
    }

    /// The property tests below are only as good as the cases: each rule, and an
    /// applied transfer, must come up often, or a wrong order could pass unseen.
    #[test]
    fn the_generated_cases_reach_every_rule_and_applied_transfers() {
        use proptest::strategy::ValueTree;
        use std::collections::HashMap;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut seen: HashMap<Option<ResultCode>, usize> = HashMap::new();
        for _ in 0..20_000 {
            let case = any_case().new_tree(&mut runner).unwrap().current();
            let outcome = match decide_case(&case) {
                Decision::Reject { code, .. } => Some(code),
                Decision::Apply { .. } => None,
            };
            *seen.entry(outcome).or_default() += 1;
        }
        use ResultCode::*;
        for outcome in [
            Some(SameCard),
            Some(CardNotFound),
            Some(GiftCardNotActive),
            Some(GiftCardExpired),
            Some(CardStatusNotAllowed),
            Some(OwnerAffiliateNotFound),
            Some(AffiliateMismatch),
            Some(CollectionNotAllowed),
            Some(UsageRateTooLow),
            Some(CollectionBalanceZero),
            Some(InsufficientBalance),
            Some(BalanceOverMax),
            None,
        ] {
            let n = seen.get(&outcome).copied().unwrap_or(0);
            assert!(n >= 50, "{outcome:?} came up {n} times in 20000 cases: {seen:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn every_decision_is_the_documented_orders(case in any_case()) {
            let (r, from, to) = &case;
            prop_assert_eq!(decide_case(&case), documented(r, from.as_ref(), to.as_ref()));
        }

        #[test]
        fn an_applied_transfer_moves_what_was_asked_or_the_whole_balance_and_conserves_money(case in any_case()) {
            let (r, from, to) = &case;
            if let Decision::Apply { amount } = decide_case(&case) {
                let (from, to) = (from.as_ref().unwrap(), to.as_ref().unwrap());
                let asked = r.amount.filter(|a| !a.is_zero()).unwrap_or(from.balance);
                prop_assert_eq!(amount, asked);
                let (mut f, mut t) = (from.clone(), to.clone());
                let (debit, credit) = apply(&mut f, &mut t, amount);
                prop_assert_eq!(f.balance.get(), from.balance.get() - amount.get());
                prop_assert_eq!(t.balance.get(), to.balance.get() + amount.get());
                prop_assert_eq!(f.balance.get() + t.balance.get(), from.balance.get() + to.balance.get());
                prop_assert_eq!((debit.delta, credit.delta), (-amount.get(), amount.get()));
                prop_assert_eq!((debit.balance_after, credit.balance_after), (f.balance, t.balance));
                prop_assert_eq!(f.total_loaded, from.total_loaded, "sending takes nothing from what was loaded");
                prop_assert_eq!(t.total_loaded.get(), to.total_loaded.get() + amount.get());
                prop_assert!(t.balance <= t.max_balance);
                prop_assert!(!amount.is_zero());
                prop_assert_eq!((f.sequence, t.sequence), (from.sequence + 1, to.sequence + 1));
            }
        }
    }
}
