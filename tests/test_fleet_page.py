"""The fleet page ([web], collector/web/): its state decisions and authentication (pure), its views against the
fleet lab's real InfluxDB (labkit/fleet_lab.py), its HTTP answers, and the page itself in a real browser
(Debian's chromium through chromedriver, driven by selenium; no browser download)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import pytest

from collector.web import views
from collector.web.config import WebSettings
from collector.web.page import authorized, parse_cookies, session_value
from collector.web.units import unit_of, units_by_model
from labkit.fleet_lab import BACKLOG_AFTER_S, EAST, NORTH, PLANS, SOUTH, FleetLab
from wire.config import ConfigError, Secret, convert
from wire.http import Request

NOW = 1_800_000_000 * 10**9
S = views.ViewSettings(stale_after_s=300, backlog_after_s=120, errors_window_s=900)
TOKEN = "0123456789abcdef0123456789abcdef"


# -- states ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("health, failing, state", [
    ({"online": 0, "time": NOW}, 0, "offline"),
    ({"online": 0, "time": NOW}, 2, "offline"),  # offline wins: its devices are not polled
    ({"online": 1, "time": NOW - 301 * 10**9}, 0, "stale"),
    ({"online": 1}, 0, "stale"),
    ({"online": 1, "time": NOW, "backlog_age_s": 500.0}, 1, "errors"),
    ({"online": 1, "time": NOW, "backlog_age_s": 121.0}, 0, "backlog"),
    ({"online": 1, "time": NOW, "backlog_age_s": 119.0}, 0, "online"),
    # from a collector before backlog_age_s: the age from the heartbeat's own two times
    ({"online": 1, "time": NOW, "backlog_oldest_ns": NOW - 200 * 10**9}, 0, "backlog"),
    ({"online": 1, "time": NOW, "backlog_age_s": None, "backlog_messages": 0}, 0, "online"),
])
def test_gateway_state_worst_first(health: dict, failing: int, state: str) -> None:
    assert views.gateway_state(health, failing, NOW, S) == state


def test_influxql_names_and_strings_are_quoted() -> None:
    assert views.string("gw'x\\") == "'gw\\'x\\\\'"
    assert views.ident('m"x') == '"m\\"x"'
    assert "\"gateway\" = 'it\\'s'" in views.gateway_query("it's", S)


def test_a_gateway_silent_beyond_the_window_is_listed_as_not_heard() -> None:
    def series(columns: list[str], *rows: list, tags: dict | None = None) -> dict:
        return {"name": "m", "columns": columns, "values": list(rows), **({"tags": tags} if tags else {})}

    answer = {"results": [
        {"series": [series(["time", "online", "backlog_age_s"], [NOW - 10**9, 1, 0.0], tags={"gateway": "gw-a"})]},
        {"series": [series(["time", "latitude", "longitude"], [NOW, 52.5, 13.4], tags={"gateway": "gw-a"})]},
        {},
        {"series": [series(["key", "value"], ["gateway", "gw-a"], ["gateway", "gw-gone"])]},
        {},
    ]}
    doc = views.fleet_view(answer, NOW, S)
    assert [(g["id"], g["state"], g["last_seen_ns"]) for g in doc["gateways"]] == [
        ("gw-a", "online", NOW - 10**9), ("gw-gone", "stale", None)]
    assert doc["gateways"][0]["location"]["lat"] == 52.5 and doc["gateways"][1]["location"] is None


def test_the_inventory_location_and_configuration_come_first() -> None:
    """citynerve_gateway_info (the fleet inventory): a configured location wins over the gateway's last GPS point,
    and the table shows the running configuration's version. Both gateways are known only from it and the index."""
    info = {"name": "citynerve_gateway_info", "columns": ["time", "version", "config_version", "latitude", "longitude",
                                                          "location_source", "location_time_ns"]}
    answer = {"results": [
        {},
        {"series": [{"name": "gps", "tags": {"gateway": "gw-a"}, "columns": ["time", "latitude", "longitude"],
                     "values": [[NOW, 1.0, 2.0]]}]},
        {},
        {"series": [{"name": "m", "columns": ["key", "value"], "values": [["gateway", "gw-a"], ["gateway", "gw-b"]]}]},
        {"series": [{**info, "tags": {"gateway": "gw-a"}, "values": [[NOW, "0.3.0", 7, 52.52, 13.40, "config", None]]},
                    {**info, "tags": {"gateway": "gw-b"}, "values": [[NOW, "0.3.0", 0, None, None, None, None]]}]},
    ]}
    a, b = views.fleet_view(answer, NOW, S)["gateways"]
    assert a["location"] == {"lat": 52.52, "lon": 13.40, "source": "config", "time_ns": NOW}
    assert (a["config_version"], a["version"], b["config_version"], b["location"]) == (7, "0.3.0", 0, None)


def test_a_refused_statement_is_an_error_not_an_empty_fleet() -> None:
    with pytest.raises(views.InfluxQLError, match="database not found"):
        views.fleet_view({"results": [{"statement_id": 0, "error": "database not found: x"}]}, NOW, S)


def test_units_come_from_the_vocabulary_then_the_bundled_profiles_by_model(tmp_path) -> None:
    assert unit_of("voltage_l1") == "V" and unit_of("energy_import", "SDM630") == "kWh"
    assert unit_of("power_total") == "" and unit_of("power_total", "SDM630") == ""  # not a standard name
    assert units_by_model()["SDM120"]["frequency"] == "Hz"
    # every bundled profile names its points from the vocabulary; a profile's own name keeps the profile's unit
    (tmp_path / "custom.toml").write_text('model = "X1"\n[[points]]\nname = "power_total"\nunit = "W"\n')
    assert units_by_model(tmp_path) == {"X1": {"power_total": "W"}}
    assert unit_of("no_such_field", "SDM630") == ""


# -- authentication ----------------------------------------------------------------------------------------------

def _settings(**values: object) -> WebSettings:
    return convert({"listen": "127.0.0.1:8080", **values}, WebSettings, "collector.toml")


def test_a_request_needs_the_token_as_bearer_or_the_session_cookie() -> None:
    settings = _settings(token=TOKEN)

    def req(**headers: str) -> Request:
        return Request("GET", "/api/fleet", "/api/fleet", {}, headers)

    assert not authorized(req(), settings)
    assert authorized(req(authorization=f"Bearer {TOKEN}"), settings)
    assert not authorized(req(authorization=f"Bearer {TOKEN[:-1]}x"), settings)
    assert authorized(req(cookie=f"other=1; citynerve_fleet={session_value(TOKEN)}"), settings)
    assert not authorized(req(cookie=f"citynerve_fleet={TOKEN}"), settings)  # the session value, not the token
    assert parse_cookies("a=1; b=x=y; c") == {"a": "1", "b": "x=y"}


def test_client_certificates_and_token_are_both_demanded_when_both_are_set(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    settings = _settings(token=TOKEN, tls_cert=str(pem), tls_key=str(pem), client_ca=str(pem))
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert not authorized(Request("GET", "/", "/", {}, bearer), settings)
    assert authorized(Request("GET", "/", "/", {}, bearer, client_certificate=True), settings)
    only_certs = _settings(tls_cert=str(pem), tls_key=str(pem), client_ca=str(pem))
    assert authorized(Request("GET", "/", "/", {}, {}, client_certificate=True), only_certs)


@pytest.mark.parametrize("values, key, message", [
    ({}, "token", "needs authentication"),
    ({"token": "short"}, "token", "at least 22 characters"),
    ({"token": TOKEN, "listen": "0.0.0.0:8080"}, "listen", "not a loopback address"),
    ({"token": TOKEN, "listen": "0.0.0.0:8080", "allow_remote": True}, "tls_cert", "needs TLS"),
    ({"token": TOKEN, "client_ca": "/etc/hostname"}, "client_ca", "need TLS"),
    ({"token": TOKEN, "tls_cert": "/nonexistent.crt", "tls_key": "/nonexistent.key"}, "tls_cert", "does not exist"),
    ({"token": TOKEN, "tiles": "ftp://tiles/{z}/{x}/{y}.png"}, "tiles", "http(s) URL"),
    ({"token": TOKEN, "tiles": "https://tiles/{z}/{x}.png"}, "tiles", "{y}"),
    ({"token": TOKEN, "listen": "127.0.0.1:99999"}, "listen", "1..65535"),
    ({"token": TOKEN, "stale_after": "0s"}, "stale_after", "greater than 0"),
])
def test_web_settings_errors_name_the_key(values: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(**values)
    assert f"web.{key}" in str(info.value) or key in str(info.value)
    assert message in str(info.value)


def test_the_content_security_policy_allows_the_tile_server_and_nothing_else() -> None:
    from collector.web.page import security_headers

    policy = dict(security_headers(_settings(token=TOKEN, tiles="https://tiles.city.example:8443/{z}/{x}/{y}.png")))
    csp = policy["Content-Security-Policy"]
    assert "img-src 'self' https://tiles.city.example:8443;" in csp
    assert csp.count("http") == 1 and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp


def test_the_token_may_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "web.token"
    path.write_text(TOKEN + "\n")
    settings = _settings(token={"file": str(path)})
    assert isinstance(settings.token, Secret) and settings.token.value.strip() == TOKEN


# -- the views against the fleet lab's InfluxDB ------------------------------------------------------------------

@pytest.mark.integration
def test_fleet_view_from_the_lab(fleet: FleetLab) -> None:
    s = views.ViewSettings(backlog_after_s=BACKLOG_AFTER_S)
    answer = fleet.influx._request("GET", "/query", {"q": views.fleet_query(s), "db": fleet.database,
                                                         "epoch": "ns"})
    doc = views.fleet_view(msgspec.json.decode(answer), _now(), s)
    by_id = {g["id"]: g for g in doc["gateways"]}
    assert set(by_id) == {NORTH, SOUTH, EAST}
    assert by_id[SOUTH]["state"] == "offline"
    assert by_id[NORTH]["state"] == "errors" and by_id[NORTH]["failing_devices"] == ["meter-dead"]
    assert by_id[EAST]["state"] == "backlog" and by_id[EAST]["backlog_messages"] > 0
    for plan in PLANS:
        location = by_id[plan.id]["location"]
        assert location["source"] == "gps"
        assert abs(location["lat"] - plan.latitude) < 1e-4 and abs(location["lon"] - plan.longitude) < 1e-4
    assert doc["summary"] == {"offline": 1, "stale": 0, "errors": 1, "backlog": 1, "online": 0}


def _now() -> int:
    import time

    return time.time_ns()


# -- HTTP, as a client sees it ------------------------------------------------------------------------------------

def _http(fleet: FleetLab, method: str, path: str, body: bytes = b"", **headers: str):
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(fleet.web_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        headers = dict(response.getheaders())
        headers["x-header-names"] = ",".join(name for name, _ in response.getheaders())
        return response.status, headers, response.read()
    finally:
        conn.close()


@pytest.mark.integration
def test_the_page_needs_the_token_and_is_read_only(fleet: FleetLab) -> None:
    status, headers, body = _http(fleet, "GET", "/")
    assert status == 200 and b'name="token"' in body and NORTH.encode() not in body  # the sign-in form only
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "http" not in csp  # nothing from elsewhere
    assert _http(fleet, "GET", "/api/fleet")[0] == 401
    assert _http(fleet, "GET", "/api/fleet", Authorization="Bearer " + "0" * 32)[0] == 401
    status, _, _ = _http(fleet, "GET", "/static/app.js")
    assert status == 200  # code, no data: the form needs the style and the page its code before a session

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = _http(fleet, "POST", "/login", b"token=wrong", **form)
    assert status == 401 and b"Wrong token" in body
    status, headers, _ = _http(fleet, "POST", "/login", f"token={fleet.web_token}".encode(), **form)
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and fleet.web_token not in cookie
    session = cookie.split(";")[0]
    status, _, body = _http(fleet, "GET", "/api/fleet", Cookie=session)
    assert status == 200 and {g["id"] for g in msgspec.json.decode(body)["gateways"]} == {NORTH, SOUTH, EAST}
    # read-only: nothing but GET (and the sign-in's POST)
    for method, path in [("POST", "/api/fleet"), ("PUT", "/"), ("DELETE", "/api/gateway?id=x"), ("POST", "/")]:
        assert _http(fleet, method, path, Cookie=session)[0] == 405, (method, path)


@pytest.mark.integration
def test_gateway_and_rejections_documents(fleet: FleetLab) -> None:
    bearer = {"Authorization": f"Bearer {fleet.web_token}"}
    status, _, body = _http(fleet, "GET", f"/api/gateway?id={NORTH}", **bearer)
    assert status == 200
    doc = msgspec.json.decode(body)
    devices = {d["id"]: d for d in doc["devices"]}
    assert set(devices) == {"meter-1", "meter-dead", "gps"} and doc["state"] == "errors"
    assert devices["meter-dead"]["failing"] and "no answer" in devices["meter-dead"]["last_error"]
    electricity = devices["meter-1"]["measurements"]["electricity"]
    assert electricity["model"] == "SDM630" and electricity["units"]["voltage_l1"] == "V"
    assert len(electricity["series"]["voltage_l1"]) >= 1
    assert devices["gps"]["measurements"]["gps"]["fields"]["latitude"] == pytest.approx(PLANS[0].latitude, abs=1e-4)

    status, _, body = _http(fleet, "GET", "/api/rejections", **bearer)
    doc = msgspec.json.decode(body)
    assert doc["rejected"]["malformed"] >= 1 and doc["rejected"]["topic_mismatch"] >= 1
    assert doc["declined"]["device_limit"] >= 1  # gw.east-3's fourth device
    assert {(q["reason"], q["gateway"]) for q in doc["quarantine"]} >= {("malformed", NORTH), ("topic_mismatch", NORTH)}
    assert _http(fleet, "GET", "/api/gateway", **bearer)[0] == 400
    assert _http(fleet, "GET", "/api/gateway?id=../../x", **bearer)[0] == 400
    # a HEAD between two GETs of a cached view takes nothing from the GET after it
    status, headers, body = _http(fleet, "HEAD", "/api/fleet", **bearer)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 100
    status, headers, body = _http(fleet, "GET", "/api/fleet", **bearer)
    assert len(body) == int(headers["Content-Length"]) > 100
    assert headers["x-header-names"].count("Content-Security-Policy") == 1  # not once more per cached answer


# -- the page in a real browser ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Debian's chromium, headless, through Debian's chromedriver: selenium downloads nothing (SE_OFFLINE, and
    both paths given), and the browser reaches nothing but the page (no background networking)."""
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        pytest.fail("chromium and chromium-driver are missing: make deps installs them")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    profile = tmp_path_factory.mktemp("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                     "--disable-sync", "--disable-extensions", "--no-first-run", "--metrics-recording-only",
                     "--disable-features=Translate,OptimizationHints,MediaRouter", "--window-size=1400,1500",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    service = Service(executable_path="/usr/bin/chromedriver", log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _influx_values(fleet: FleetLab, gateway: str, device: str, measurement: str, field: str) -> list[float]:
    rows = fleet.query(f'SELECT "{field}" FROM "{measurement}" WHERE gateway = \'{gateway}\' AND device = '
                       f"'{device}' AND time > now() - 10m")
    return [r[field] for r in rows if r.get(field) is not None]


@pytest.mark.integration
def test_the_fleet_page_in_a_real_browser(fleet: FleetLab, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(fleet.web_url + "/")
    browser.find_element(By.ID, "token").send_keys(fleet.web_token)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()

    # the map shows every gateway, each in its state
    markers = wait.until(lambda d: (m := d.find_elements(By.CSS_SELECTOR, "#map g.gw")) and len(m) == 3 and m)
    states = {m.get_attribute("data-gateway"): m.get_attribute("data-state") for m in markers}
    assert states == {NORTH: "errors", SOUTH: "offline", EAST: "backlog"}
    assert not browser.find_elements(By.CSS_SELECTOR, "#map .tiles")  # no tile server configured: a grid
    assert browser.find_elements(By.CSS_SELECTOR, "#map .grid line")
    # the table, sortable: by backlog, largest first
    rows = browser.find_elements(By.CSS_SELECTOR, "#fleet-table tbody tr")
    assert {r.get_attribute("data-gateway") for r in rows} == {NORTH, SOUTH, EAST}
    header = browser.find_element(By.CSS_SELECTOR, '#fleet-table th[data-key="backlog_messages"]')
    header.click()
    header.click()
    first = browser.find_element(By.CSS_SELECTOR, "#fleet-table tbody tr").get_attribute("data-gateway")
    assert first == EAST and "sorted-desc" in header.get_attribute("class")
    # rejections and quarantine by reason code
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#quarantine-table tr[data-reason="malformed"]')))
    reasons = {r.get_attribute("data-reason") for r in browser.find_elements(By.CSS_SELECTOR, "#rejections-table tr")}
    assert {"malformed", "topic_mismatch", "device_limit"} <= reasons
    _screenshot(browser, tmp_path, "fleet-page.png")

    # a gateway's page: its devices, their latest values as InfluxDB holds them, with units, and a chart
    next(m for m in markers if m.get_attribute("data-gateway") == NORTH).click()
    card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#device-cards [data-device="meter-1"]')))
    assert browser.find_element(By.ID, "gateway-title").text.startswith(NORTH)
    devices = {r.get_attribute("data-device") for r in browser.find_elements(By.CSS_SELECTOR, "#devices-table tr[data-device]")}
    assert devices == {"meter-1", "meter-dead", "gps"}
    shown = {}
    for row in card.find_elements(By.CSS_SELECTOR, "table.values tbody tr"):
        value = row.find_element(By.CSS_SELECTOR, "td[data-value]").get_attribute("data-value")
        shown[row.get_attribute("data-field")] = (value, row.find_element(By.CSS_SELECTOR, "td.unit").text)
    assert {"voltage_l1", "current_l1", "frequency", "energy_import"} <= set(shown)
    for field in ("voltage_l1", "current_l1", "frequency", "energy_import"):
        stored = _influx_values(fleet, NORTH, "meter-1", "electricity", field)
        assert float(shown[field][0]) in stored, f"{field}: the page shows {shown[field][0]}, InfluxDB holds {stored[-5:]}"
    assert shown["voltage_l1"][1] == "V" and shown["energy_import"][1] == "kWh" and shown["frequency"][1] == "Hz"
    polyline = card.find_element(By.CSS_SELECTOR, ".chart polyline").get_attribute("points")
    assert len(polyline.split()) >= 1
    dead = browser.find_element(By.CSS_SELECTOR, '#devices-table tr[data-device="meter-dead"]').text
    assert "no answer" in dead
    _screenshot(browser, tmp_path, "fleet-page-gateway.png")
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the browser's console: {errors}"

    # with a tile server configured the map's background is its Web Mercator tiles around the gateways (drawn here
    # by the page's own code with the lab's gateways; the images themselves are not loaded: no tile server here)
    browser.get(fleet.web_url + "/#/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#map g.gw")) == 3)
    hrefs = browser.execute_script(
        "drawMap(fleet.gateways, {...fleet.settings, tiles: 'https://tiles.example/{z}/{x}/{y}.png', "
        "tiles_max_zoom: 18, attribution: 'lab'});"
        "return [...document.querySelectorAll('#map .tiles image')].map(i => i.getAttribute('href'));")
    assert hrefs and not browser.find_elements(By.CSS_SELECTOR, "#map .grid")
    tiles = {tuple(int(n) for n in re.fullmatch(r"https://tiles\.example/(\d+)/(\d+)/(\d+)\.png", h).groups())
             for h in hrefs}
    zoom = {z for z, _, _ in tiles}.pop()
    for plan in PLANS:  # every gateway's own tile is drawn
        assert _tile(plan.latitude, plan.longitude, zoom) in {(x, y) for _, x, y in tiles}, plan.id


def _tile(lat: float, lon: float, zoom: int) -> tuple[int, int]:
    """The Web Mercator (slippy map) tile holding a point at a zoom."""
    import math

    n = 2**zoom
    y = (1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n
    return int((lon + 180) / 360 * n), int(y)


def _screenshot(browser, tmp_path: Path, name: str) -> None:
    """Into the test's directory; and into CITYNERVE_SCREENSHOTS (e.g. docs/) when set, to refresh the docs."""
    browser.save_screenshot(str(tmp_path / name))
    if os.environ.get("CITYNERVE_SCREENSHOTS"):
        browser.save_screenshot(str(Path(os.environ["CITYNERVE_SCREENSHOTS"]) / name))
