"""What a refused user is told, per reason code: Japanese first, English below.

Generic to clients, precise in the audit: these texts never carry DNs,
serials of other users, paths or stack traces. The certificate reasons all
open with the manual's sentence 有効なクライアント証明書ではありません, except
the no-certificate page: it names what happened (nothing was presented) and
lists the steps, the manual's sentence below its title.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.verdict import CERTIFICATE_REASONS, Reason

NOT_VALID_JA = "有効なクライアント証明書ではありません"
NOT_VALID_EN = "This is not a valid client certificate"

_RESTART_JA = (
    "ブラウザを再起動し、正しい https の URL であることを確認して、証明書の選択画面で正しい証明書を選択してください。"
)
_RESTART_EN = (
    "Restart the browser, make sure the https URL is correct, and choose the right certificate in the selection dialog."
)
_PICK_JA = "ご自身のユーザIDに対して Tokyo Stock Exchange SSO CA が発行した証明書を選択してください。"
_PICK_EN = "Choose the certificate issued to your user ID by Tokyo Stock Exchange SSO CA."


@dataclass(frozen=True, slots=True)
class Message:
    status: int
    title_ja: str
    title_en: str
    advice_ja: str
    advice_en: str
    # Numbered steps (Japanese, English), shown as a list under the advice.
    steps: tuple[tuple[str, str], ...] = ()


NO_CERTIFICATE_TITLE_JA = "証明書が提示されていません"
NO_CERTIFICATE_TITLE_EN = "No client certificate was presented"
SUPPORT_ID_ADVICE_JA = "お問い合わせの際はこのサポートIDをお伝えください"
SUPPORT_ID_ADVICE_EN = "Please quote this support ID"


MESSAGES: dict[Reason, Message] = {
    Reason.NO_CERTIFICATE: Message(
        403,
        NO_CERTIFICATE_TITLE_JA,
        NO_CERTIFICATE_TITLE_EN,
        NOT_VALID_JA + "。ブラウザからクライアント証明書が送られませんでした。次の手順でお試しください。",
        NOT_VALID_EN + ": the browser sent no client certificate. Please follow these steps.",
        (
            (
                "この端末に証明書がない場合は、証明書発行サービスで証明書を取得してインストールしてください。",
                "If this terminal has no certificate, obtain one in the certificate issuance service and install it.",
            ),
            ("ブラウザをすべて閉じて再起動してください。", "Close every browser window and restart the browser."),
            ("正しい https の URL であることを確認してください。", "Make sure the https URL is correct."),
            (
                "証明書の選択画面で、ご自身のユーザIDに対して Tokyo Stock Exchange SSO CA が発行した証明書を選択してください。",
                "In the certificate selection dialog, choose the certificate issued to your user ID by Tokyo Stock Exchange SSO CA.",
            ),
        ),
    ),
    Reason.UNTRUSTED_CERTIFICATE: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "提示された証明書は Tokyo Stock Exchange SSO CA が発行したものではありません(旧 TSE-CA2 の証明書は使用できません)。"
        + _PICK_JA,
        "The certificate was not issued by Tokyo Stock Exchange SSO CA (certificates from the old TSE-CA2 are no longer valid). "
        + _PICK_EN,
    ),
    Reason.CERTIFICATE_EXPIRED: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "証明書の有効期限が切れています。証明書発行サービスで新しい証明書を発行し、古い証明書を削除してからブラウザを再起動してください。",
        "The certificate has expired. Issue a new one in the certificate issuance service, delete the old one, and restart the browser.",
    ),
    Reason.CERTIFICATE_NOT_YET_VALID: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "証明書の有効期間がまだ始まっていません。端末の時刻を確認してください。",
        "The certificate is not valid yet. Check this terminal's clock.",
    ),
    Reason.CERTIFICATE_REVOKED: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "この証明書は失効しています。証明書発行サービスで証明書を再発行し、失効した証明書を削除してからブラウザを再起動してください。",
        "This certificate has been revoked. Reissue a certificate in the issuance service, delete the revoked one, and restart the browser.",
    ),
    Reason.REVOCATION_UNAVAILABLE: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "証明書の失効状況を確認できないため、安全のためアクセスをお断りしています。しばらくしてから再度お試しください。解決しない場合はサポートIDをお知らせください。",
        "The certificate's revocation status cannot be checked right now, so access is refused for safety. Try again later; if it persists, contact support with the ID below.",
    ),
    Reason.WRONG_KEY_USAGE: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "この証明書はクライアント認証用ではありません。" + _PICK_JA,
        "This certificate is not meant for client authentication. " + _PICK_EN,
    ),
    Reason.MALFORMED_SUBJECT: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "証明書の発行先がユーザIDの形式ではありません。" + _PICK_JA,
        "The certificate is not issued to a user ID. " + _PICK_EN,
    ),
    Reason.MALFORMED_CERTIFICATE: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "この証明書は SSO のクライアント証明書の形式(鍵の種類・拡張領域・発行元 CA の証明書)を満たしていません。"
        + _PICK_JA,
        "This certificate, or the CA certificate it was issued under, does not have the form of an SSO client "
        "certificate (key type, extensions). " + _PICK_EN,
    ),
    Reason.CA_EXPIRED: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "この証明書を発行した認証局(CA)の有効期限が切れているため、この証明書は使用できません。"
        "証明書発行サービスで新しい証明書を発行し、古い証明書を削除してからブラウザを再起動してください。",
        "The certificate authority (CA) that issued this certificate has expired, so the certificate can no longer "
        "be used. Issue a new one in the certificate issuance service, delete the old one, and restart the browser.",
    ),
    Reason.CA_NOT_YET_VALID: Message(
        403,
        NOT_VALID_JA,
        NOT_VALID_EN,
        "この証明書を発行した認証局(CA)はまだ有効期間が始まっていません。端末の日時が正しいか確認し、"
        "解決しない場合はサポートIDをお知らせください。",
        "The certificate authority (CA) that issued this certificate is not valid yet. Check this terminal's date "
        "and time; if it persists, contact support with the ID below.",
    ),
    Reason.NO_ROUTE: Message(
        404,
        "ページが見つかりません",
        "Page not found",
        "URL を確認してください。",
        "Check the URL.",
    ),
    Reason.BAD_REQUEST: Message(
        400,
        "不正なリクエストです",
        "Bad request",
        "URL を確認して、もう一度お試しください。",
        "Check the URL and try again.",
    ),
    Reason.PAYLOAD_TOO_LARGE: Message(
        413,
        "送信データが大きすぎます",
        "Request body too large",
        "送信するファイルのサイズを確認してください。",
        "Check the size of what you are sending.",
    ),
    Reason.BACKEND_UNAVAILABLE: Message(
        502,
        "システムに接続できません",
        "The system is not reachable",
        "しばらくしてから再度お試しください。",
        "Try again in a few minutes.",
    ),
    Reason.BACKEND_TIMEOUT: Message(
        504,
        "システムの応答がありません",
        "The system did not answer in time",
        "しばらくしてから再度お試しください。",
        "Try again in a few minutes.",
    ),
    Reason.CLIENT_TIMEOUT: Message(
        408,
        "送信が途中で止まりました",
        "The request stopped arriving",
        "通信環境を確認して、もう一度お試しください。",
        "Check your network connection and try again.",
    ),
    Reason.SERVICE_UNAVAILABLE: Message(
        503,
        "ただいまログインを確認できません",
        "Logins cannot be checked right now",
        "一時的な障害のため、ログインとセッションを確認できません。しばらくしてから再度お試しください。"
        "解決しない場合はサポートIDをお知らせください。",
        "A temporary fault keeps the gateway from checking logins and sessions. Try again in a few minutes; "
        "if it persists, contact support with the ID below.",
    ),
    Reason.LOGIN_REQUIRED: Message(
        401,
        "ログインが必要です",
        "Login required",
        "ユーザID とパスワードでログインしてください。",
        "Log in with your user ID and password.",
    ),
    Reason.SUBJECT_MISMATCH: Message(
        403,
        "選択された証明書はこのユーザIDのものではありません",
        "The selected certificate does not belong to this user ID",
        "選択された証明書の発行先(証明書の名前)が、入力したユーザIDと一致しません。ブラウザを再起動し、ご自身のユーザIDの証明書を選択してください。",
        "The certificate chosen is issued to a different name than the user ID you entered. Restart the browser and choose the certificate issued to your user ID.",
    ),
    Reason.BAD_CREDENTIALS: Message(
        401,
        "ユーザIDまたはパスワードが正しくありません",
        "User ID or password is incorrect",
        "入力内容を確認して、もう一度お試しください。続けて失敗するとアカウントが一定時間ロックされます。",
        "Check what you entered and try again. Repeated failures lock the account for a while.",
    ),
    Reason.ACCOUNT_LOCKED: Message(
        403,
        "アカウントがロックされています",
        "The account is locked",
        "ログインの失敗が続いたため、一定時間ログインできません。しばらくしてから再度お試しください。",
        "Too many failed logins: logging in is blocked for a while. Try again later.",
    ),
    Reason.RATE_LIMITED: Message(
        429,
        "試行回数が多すぎます",
        "Too many attempts",
        "しばらくしてから再度お試しください。",
        "Try again later.",
    ),
    Reason.CSRF_FAILED: Message(
        403,
        "画面の有効期限が切れました",
        "This form has expired",
        "ページを再読み込みして、もう一度お試しください。",
        "Reload the page and try again.",
    ),
    Reason.SESSION_EXPIRED: Message(
        401,
        "セッションの有効期限が切れました",
        "Your session has expired",
        "もう一度ログインしてください。",
        "Please log in again.",
    ),
    Reason.SESSION_CERTIFICATE_MISMATCH: Message(
        403,
        "ログイン時と異なる証明書が提示されました",
        "A different certificate than at login was presented",
        "安全のためセッションを終了しました。ブラウザを再起動し、ご自身の証明書でもう一度ログインしてください。",
        "The session was ended for safety. Restart the browser and log in again with your own certificate.",
    ),
    Reason.NOT_AUTHORIZED: Message(
        403,
        "このシステムを利用する権限がありません",
        "You are not authorised for this system",
        "利用権限については管理者にお問い合わせください。",
        "Ask your administrator for access to this system.",
    ),
    Reason.PASSWORD_CHANGE_REQUIRED: Message(
        403,
        "パスワードの変更が必要です",
        "You must change your password",
        "仮パスワードでログインしました。パスワードを変更してください。",
        "You logged in with a temporary password. Please change it.",
    ),
    Reason.PASSWORD_POLICY: Message(
        400,
        "新しいパスワードが条件を満たしていません",
        "The new password does not meet the policy",
        "条件を確認して、もう一度入力してください。",
        "Check the rules and enter it again.",
    ),
    Reason.CERTIFICATE_DUPLICATE: Message(
        409,
        "証明書重複エラー",
        "Certificate duplicate error",
        "既に有効な証明書が発行されています。証明書を再発行する場合は、現在の証明書を失効してから発行してください。",
        "A valid certificate has already been issued. To get a new one, revoke the current certificate first.",
    ),
}

_FALLBACK = Message(403, "アクセスできません", "Access refused", "", "")


def message_for(reason: Reason) -> Message:
    return MESSAGES.get(reason, _FALLBACK)


def is_certificate_reason(reason: Reason) -> bool:
    return reason in CERTIFICATE_REASONS


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 entry``, ``2 entries``, ``0 sessions``: the count with the right form of ``word``."""
    if count == 1:
        return f"{count} {word}"
    if many is None:
        many = word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"
    return f"{count} {many}"
